"""Training: the layer-by-layer gradient, the fused step, PyTorch, whole runs, inference."""

import timeit

import numpy as np

import fastnet
import fastnet.nets
from fastnet.train import Trainer

from . import common
from .common import (
    BACKENDS,
    DTYPES,
    BookLoop,
    BookStep,
    FusedStep,
    TorchStep,
    batch,
    mnist_pixels,
    require_backend,
    thread_info,
)


class Gradient:
    """TwoLayerNet.gradient as the book calls it (forward, backward layer by layer)."""

    params = (BACKENDS, DTYPES)
    param_names = ["backend", "dtype"]

    def setup(self, backend, dtype):
        require_backend(backend)
        self.backend = backend
        with fastnet.use_backend(backend):
            self.net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0, dtype=dtype)
        self.x, self.t = batch(dtype)
        self.time_gradient(backend, dtype)

    def time_gradient(self, backend, dtype):
        with fastnet.use_backend(self.backend):
            self.net.gradient(self.x, self.t)


class TrainingStep:
    """One mini-batch step of 784-50-10, batch 100: draw, gradient, SGD update.
    ``bookloop``: the book's loop as printed, with its loss line (common.BookLoop);
    ``book``: gradient and update only (common.BookStep)."""

    params = (["bookloop-numpy-float64", "book-numpy-float64", "book-numpy-float32", "fused-numba-float32",
               "fused-cython-float32", "fused-cython-float64", "sparse-numba-float32",
               "sparse-cython-float32", "torch-float32"],)
    param_names = ["implementation"]

    def setup(self, implementation):
        (x, t), _ = mnist_pixels()
        kind, *rest = implementation.split("-")
        if kind == "bookloop":
            self.step = BookLoop(x, t)
        elif kind == "book":
            self.step = BookStep(rest[0], rest[1], x, t)
        elif kind in ("fused", "sparse"):
            self.step = FusedStep(rest[0], rest[1], x, t, sparse=kind == "sparse")
        else:
            self.step = TorchStep(x, t)
        for _ in range(3):
            self.step()

    def time_step(self, implementation):
        self.step()


class TrainingSteps:
    """100 steps of 784-50-10, batch 100, in one kernel call (``train_steps_2layer``):
    the path ``fastnet train`` takes with plain SGD.  Divide by 100 for a step."""

    params = (["fused-numba-float32", "fused-cython-float32", "sparse-numba-float32",
               "sparse-cython-float32"],)
    param_names = ["implementation"]

    def setup(self, implementation):
        (x, t), _ = mnist_pixels()
        kind, name, dtype = implementation.split("-")
        self.steps = FusedStep(name, dtype, x, t, sparse=kind == "sparse", steps=100)
        self.steps()

    def time_100_steps(self, implementation):
        self.steps()


class StepSpeedup:
    """The fastest fused step (cython, float32, inputs as CSR rows, 100 steps per call:
    as ``fastnet train`` runs MNIST) against the book's loop as printed (numpy, float64,
    with its loss line), the same loop without the loss line, and PyTorch, per step,
    measured side by side in one process."""

    unit = "times faster"

    def setup(self):
        (x, t), _ = mnist_pixels()
        self.fast = FusedStep("cython", "float32", x, t, sparse=True, steps=100)
        self.book = BookLoop(x, t)
        self.book_no_loss = BookStep("numpy", "float64", x, t)
        try:
            self.torch = TorchStep(x, t)
        except NotImplementedError:
            self.torch = None

    def _time(self, fn):
        """Seconds per training step (a call of ``fn`` runs ``fn.steps`` of them)."""
        fn()
        steps = getattr(fn, "steps", 1)
        number = max(1, 50 // steps)
        return min(timeit.repeat(fn, number=number, repeat=5)) / (number * steps)

    def track_vs_book_loop(self):
        return self._time(self.book) / self._time(self.fast)

    def track_vs_book_loop_without_loss_line(self):
        return self._time(self.book_no_loss) / self._time(self.fast)

    def track_vs_pytorch(self):
        if self.torch is None:
            raise NotImplementedError("PyTorch is not installed")
        return self._time(self.torch) / self._time(self.fast)


class EndToEnd:
    """A shortened chapter-5 run: 2 epochs (1200 steps) with evaluation on all 70,000 images."""

    params = (BACKENDS,)
    param_names = ["backend"]
    timeout = 300
    number = 1
    repeat = 2

    def setup(self, backend):
        require_backend(backend)
        (self.x, self.t), (self.xt, self.tt) = mnist_pixels()
        self.backend = backend
        self.dtype = "float64" if backend == "numpy" else "float32"
        self._run(120)  # warm up (JIT, caches)

    def _run(self, iters):
        with fastnet.use_backend(self.backend):
            net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0, dtype=self.dtype)
            return Trainer(net, self.x, self.t, self.xt, self.tt, iters=iters, seed=0).fit()

    def time_two_epochs(self, backend):
        self._run(1200)

    def peakmem_two_epochs(self, backend):
        self._run(1200)

    def track_test_accuracy(self, backend):
        return self._run(1200).test_acc[-1]


class Inference:
    """Accuracy over the 10,000 test images (batched predict)."""

    params = (BACKENDS, DTYPES)
    param_names = ["backend", "dtype"]

    def setup(self, backend, dtype):
        require_backend(backend)
        _, (xt, tt) = mnist_pixels()
        self.x = (xt / np.float64(255)).astype(dtype)
        self.t = tt
        self.backend = backend
        with fastnet.use_backend(backend):
            self.net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0, dtype=dtype)
            self.net.accuracy(self.x[:100], self.t[:100])

    def time_test_set(self, backend, dtype):
        with fastnet.use_backend(self.backend):
            self.net.accuracy(self.x, self.t)


class EpochEvaluation:
    """The Trainer's accuracy over the 60,000 training images, as after every epoch of
    ``fastnet train`` (common.EpochEvaluation)."""

    params = (BACKENDS,)
    param_names = ["backend"]

    def setup(self, backend):
        (x, t), _ = mnist_pixels()
        self.evaluate = common.EpochEvaluation(backend, x, t)

    def time_train_set(self, backend):
        self.evaluate()


class OptimizerUpdate:
    """One ``update`` of an optimiser on the 784-50-10 net's float32 parameters (the step
    ``fastnet train --optimizer momentum|adam`` takes after each gradient kernel call)."""

    params = (["sgd", "momentum", "adam"],)
    param_names = ["optimizer"]

    def setup(self, optimizer):
        from fastnet.optim import make_optimizer

        rng = np.random.default_rng(0)
        shapes = {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
        self.params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        self.grads = {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
        self.optimizer = make_optimizer(optimizer, 1e-3)
        self.optimizer.update(self.params, self.grads)  # state allocated

    def time_update(self, optimizer):
        self.optimizer.update(self.params, self.grads)


class Threads:
    """The thread counts every result was measured with."""

    def track_blas_threads(self):
        return max(v for k, v in thread_info().items() if k.startswith("openblas"))

    def track_numba_threads(self):
        return thread_info().get("numba", 0)
