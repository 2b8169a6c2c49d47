"""Training: the gradient, the MLP engine's steps, PyTorch, whole runs, inference."""

import timeit

import numpy as np

import fastnet
import fastnet.nets
from fastnet.train import Trainer

from . import common
from .common import (
    BACKENDS,
    DTYPES,
    NETS,
    OPTIMIZERS,
    WIDE_NETS,
    BookLoop,
    BookStep,
    EngineSteps,
    OnBackend,
    TorchStep,
    batch,
    mnist_pixels,
    require_backend,
    thread_info,
)


class Gradient(OnBackend):
    """TwoLayerNet.gradient as the book calls it: the layers on the reference backend, one
    mlp_gradient call on the compiled ones."""

    params = (BACKENDS, DTYPES)
    param_names = ["backend", "dtype"]

    def setup(self, backend, dtype):
        self.activate(backend)
        self.net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0, dtype=dtype)
        self.x, self.t = batch(dtype)
        self.time_gradient(backend, dtype)

    def time_gradient(self, backend, dtype):
        self.net.gradient(self.x, self.t)


class TrainingStep:
    """One mini-batch step of the book's 784-50-10, batch 100: draw, gradient, SGD update.
    ``book-loop``: the book's loop as printed, with its loss line (common.BookLoop);
    ``book``: gradient and update only (common.BookStep); ``engine``: the MLP engine as
    ``fastnet train`` runs it, 100 steps a call (dense rows, or ``engine-sparse``: CSR
    rows); ``torch``: PyTorch CPU (its own dtype and threads: the backend axis is not its)."""

    params = (["book-loop", "book", "engine", "engine-sparse", "torch"], BACKENDS, DTYPES)
    param_names = ["implementation", "backend", "dtype"]

    def setup(self, implementation, backend, dtype):
        (x, t), _ = mnist_pixels()
        if implementation == "book-loop":
            if (backend, dtype) != ("numpy", "float64"):
                raise NotImplementedError("the book's loop runs on NumPy in float64")
            self.step = BookLoop(x, t)
        elif implementation == "book":
            self.step = BookStep(backend, dtype, x, t)
        elif implementation.startswith("engine"):
            self.step = EngineSteps(backend, dtype, x, t, sparse=implementation.endswith("sparse"))
        else:
            if (backend, dtype) != ("numpy", "float32"):
                raise NotImplementedError("PyTorch is measured once, in float32")
            self.step = TorchStep(x, t)
        for _ in range(2):
            self.step()

    def time_step(self, implementation, backend, dtype):
        self.step()  # a call of the engine runs 100 steps: divide by 100 for a step


class EngineMatrix:
    """Every net of the matrix with every optimiser on MNIST and Fashion-MNIST: the time of
    a step of fastnet as ``fastnet train`` runs it (cython, float32, the Trainer's sparse
    rule, 100 steps a call), and its speed-up over the book's loop on the reference backend
    (float64: gradient, optimizer.update and the loop's loss line) and over PyTorch CPU
    (float32), each ratio timed side by side in one process."""

    params = (list(NETS), list(OPTIMIZERS), ["mnist", "fashion"])
    param_names = ["net", "optimizer", "data"]
    timeout = 300

    def setup(self, net, optimizer, data):
        (x, t), _ = mnist_pixels(fashion=data == "fashion")
        hidden = NETS[net]
        self.fast = EngineSteps("cython", "float32", x, t, hidden, optimizer)
        self.book = BookStep("numpy", "float64", x, t, hidden, optimizer, loss_line=True)
        try:
            self.torch = TorchStep(x, t, hidden, optimizer)
        except NotImplementedError:
            self.torch = None
        self.fast()

    def _per_step(self, fn, seconds=0.3):
        fn()
        steps = getattr(fn, "steps", 1)
        start, n = timeit.default_timer(), 0
        while timeit.default_timer() - start < seconds:
            fn()
            n += 1
        return min(timeit.repeat(fn, number=max(1, n // 3), repeat=3)) / (max(1, n // 3) * steps)

    def time_step(self, net, optimizer, data):
        self.fast()  # 100 steps

    def track_vs_reference(self, net, optimizer, data):
        return self._per_step(self.book) / self._per_step(self.fast)

    def track_vs_pytorch(self, net, optimizer, data):
        if self.torch is None:
            raise NotImplementedError("PyTorch is not installed")
        return self._per_step(self.torch) / self._per_step(self.fast)

    track_vs_reference.unit = track_vs_pytorch.unit = "times faster"


class WideLayers:
    """The wide nets of common.WIDE_NETS (SGD, MNIST, cython float32, CSR rows): a step
    (20 a call) and the Trainer's accuracy over the 60,000 training images.  A width of a
    power of two should cost about what its neighbour does (1,024 against 1,000); without
    fn_padded's extra line (kernels/_sparse.h) W1's padded rows put every column of such
    a width in the same cache sets."""

    params = (list(WIDE_NETS),)
    param_names = ["net"]
    timeout = 300

    def setup(self, net):
        (x, t), _ = mnist_pixels()
        self.fast = EngineSteps("cython", "float32", x, t, WIDE_NETS[net], steps=20)
        with fastnet.use_backend("cython"):
            self.trainer = Trainer(self.fast.net, x, t, iters=1)
        self.fast()
        self.time_accuracy(net)  # the CSR rows built here, not in the timing

    def time_step(self, net):
        self.fast()  # 20 steps

    def time_accuracy(self, net):
        with fastnet.use_backend("cython"):
            self.trainer.accuracy(self.trainer.x_train, self.trainer.t_train)


class StepSpeedup:
    """The book's net as ``fastnet train`` runs MNIST (cython, float32, CSR rows, 100 steps
    per call) against the book's loop as printed (numpy, float64, with its loss line), the
    same loop without the loss line, and PyTorch, per step, measured side by side."""

    unit = "times faster"

    def setup(self):
        (x, t), _ = mnist_pixels()
        self.fast = EngineSteps("cython", "float32", x, t, sparse=True)
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


class Inference(OnBackend):
    """Accuracy over the 10,000 test images (predict_mlp on the compiled backends)."""

    params = (BACKENDS, DTYPES)
    param_names = ["backend", "dtype"]

    def setup(self, backend, dtype):
        self.activate(backend)
        _, (xt, tt) = mnist_pixels()
        self.x = (xt / np.float64(255)).astype(dtype)
        self.t = tt
        self.net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0, dtype=dtype)
        self.net.accuracy(self.x[:100], self.t[:100])

    def time_test_set(self, backend, dtype):
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


class Threads:
    """The thread counts every result was measured with."""

    def track_blas_threads(self):
        return max(v for k, v in thread_info().items() if k.startswith("openblas"))

    def track_numba_threads(self):
        return thread_info().get("numba", 0)
