"""Shared set-up for the asv suites and the report: data, nets, thread counts, PyTorch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import fastnet
import fastnet.nets
from fastnet import backend
from fastnet.cli import DEFAULT_LR
from fastnet.kernels.contract import Act, Opt, mlp_size

BACKENDS = ("numpy", "numba", "cython")
DTYPES = ("float32", "float64")
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def require_backend(name: str):
    """asv convention: a combination that cannot run raises NotImplementedError in setup."""
    why = backend.why_unavailable(name)
    if why:
        raise NotImplementedError(why)
    return backend.load(name)


class OnBackend:
    """A suite whose timed calls go through fastnet's active backend: ``activate`` (from
    setup) makes it the given one and teardown restores the previous, so that the
    ``time_*`` bodies are the call alone."""

    def activate(self, name: str):
        module = require_backend(name)
        self._previous = backend.get_backend()
        backend.set_backend(name)
        return module

    def teardown(self, *params):
        backend.set_backend(self._previous)


def mnist_pixels(n_train=None, fashion=False):
    """Real MNIST (Fashion-MNIST when ``fashion``) as uint8 (from FASTNET_DATA,
    ../shared/data, the system's datasets or the cache) or, when it is not there,
    synthetic images with its shape and sparsity (19% non-zero; Fashion-MNIST 50%)."""
    from fastnet.datasets import DatasetError, load_fashion_mnist, load_mnist

    data_dir = os.environ.get("FASTNET_DATA") or (SHARED if SHARED.exists() else None)
    try:
        load = load_fashion_mnist if fashion else load_mnist
        (x, t), (xt, tt) = load(normalize=False, data_dir=data_dir, download=False, progress=False)
    except DatasetError:
        rng = np.random.default_rng(0)
        density = 0.5 if fashion else 0.19
        x = (rng.random((60000, 784)) * 255 * (rng.random((60000, 784)) < density)).astype(np.uint8)
        t = rng.integers(0, 10, 60000).astype(np.uint8)
        xt, tt = x[:10000].copy(), t[:10000].copy()
    if n_train:
        x, t = x[:n_train], t[:n_train]
    return (x, t.astype(np.int64)), (xt, tt.astype(np.int64))


_CSR = {}


def mnist_csr(d=784):
    """The CSR rows (indptr, indices, data) of the MNIST training pixels' first d columns."""
    if d not in _CSR:
        (x, _), _ = mnist_pixels()
        _CSR[d] = backend.load("numpy").sparse_rows(np.ascontiguousarray(x[:, :d]))
    return _CSR[d]


def batch(dtype, size=100, seed=0):
    """One mini-batch of MNIST-like rows, normalised, and its labels."""
    (x, t), _ = mnist_pixels()
    idx = np.random.default_rng(seed).integers(0, len(x), size)
    return (x[idx] / np.float64(255)).astype(dtype), t[idx]


def thread_info() -> dict:
    """Thread counts of every pool that can run our work (recorded with each result)."""
    info = {}
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            key = f"{pool['internal_api']}:{Path(pool['filepath']).name}"
            info[key] = pool["num_threads"]
    except ImportError:
        info["threadpoolctl"] = "not installed"
    try:
        import numba

        info["numba"] = numba.get_num_threads()
    except ImportError:
        pass
    torch = try_torch()
    if torch is not None:
        info["torch"] = torch.get_num_threads()
    info["cpus"] = os.cpu_count()
    return info


def try_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


#: the nets and optimisers of the benchmark matrix (hidden layers of 784-...-10)
NETS = {"784-50-10": (50,), "784-100-10": (100,), "784-100-100-10": (100, 100), "784-100x5-10": (100,) * 5}
OPTIMIZERS = ("sgd", "momentum", "adam")
#: wide nets (SGD on MNIST) beside the matrix: widths of a power of two and a neighbour
#: (without fn_padded's extra line in kernels/_sparse.h, the padded rows of W1 of such a
#: width fall into the same cache sets)
WIDE_NETS = {"784-1000-10": (1000,), "784-1024-10": (1024,), "784-2048-10": (2048,),
             "784-1024-1024-10": (1024, 1024)}
#: the learning rates the matrix trains with: fastnet train's defaults (the book's 0.1 for
#: SGD, chapter 6's others)
LEARNING_RATES = DEFAULT_LR


def torch_net(torch, seed=0, dtype="float32", hidden=(50,), optimizer="sgd"):
    torch.manual_seed(seed)
    sizes = (784, *hidden, 10)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(getattr(torch, dtype))
    lr = LEARNING_RATES[optimizer]
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=lr), "momentum": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
            "adagrad": lambda p: torch.optim.Adagrad(p, lr=lr), "adam": lambda p: torch.optim.Adam(p, lr=lr)}
    return model, make[optimizer](model.parameters()), torch.nn.CrossEntropyLoss()


class EngineSteps:
    """One call of the MLP engine as ``fastnet train`` makes it: ``steps`` training steps
    of a net of layer sizes ``(784, *hidden, 10)`` with ``optimizer`` inside the kernel,
    on MNIST rows (uint8 pixels) through ``train_steps_mlp``, or their CSR rows through
    ``train_steps_mlp_sparse`` when ``sparse`` (None: the Trainer's rule, as the command
    decides).  Time per step = time per call / steps."""

    def __init__(self, name, dtype, x, t, hidden=(50,), optimizer="sgd", sparse=None, steps=100, batch_size=100,
                 seed=0):
        from fastnet.train import Trainer

        self.k = require_backend(name)
        with fastnet.use_backend(name):
            self.net = fastnet.nets.MultiLayerNet(784, list(hidden), 10, seed=seed, dtype=dtype,
                                                  weight_init_std="he")
            trainer = Trainer(self.net, x, t, iters=1, optimizer=optimizer, lr=LEARNING_RATES[optimizer],
                              sparse="auto" if sparse is None else sparse)
            self.sparse = trainer.use_sparse()
        self.rows = self.k.sparse_rows(x) if self.sparse else (x,)
        self.step = self.k.train_steps_mlp_sparse if self.sparse else self.k.train_steps_mlp
        self.theta = self.net.flat_params()
        self.opt = trainer.optimizer.record()
        self.state = np.zeros((2, self.theta.size), self.theta.dtype)
        self.steps, self.batch_size, self.n = int(steps), batch_size, len(x)
        self.t, self.losses = t, np.empty(self.steps)
        self.rng = np.random.default_rng(seed)

    def __call__(self):
        idx = self.rng.integers(0, self.n, (self.steps, self.batch_size))
        return self.step(*self.rows, self.t, idx, self.net.sizes, self.net.act_code, self.theta, self.opt,
                         self.state, self.losses)


class EpochEvaluation:
    """The Trainer's accuracy over the 60,000 training images on backend ``name``, as after
    every epoch of ``fastnet train`` (uint8 pixels, float32 784-50-10; compiled backends:
    CSR rows, one sparse_predict_mlp call; numpy: predict_mlp, the dense forward in chunks)."""

    def __init__(self, name, x, t):
        from fastnet.train import Trainer

        require_backend(name)
        self.name = name
        with fastnet.use_backend(name):
            net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0, dtype=np.float32)
            self.trainer = Trainer(net, x, t, iters=1)
        self()  # the CSR rows built (and Numba compiled) here, not in the timing

    def __call__(self):
        with fastnet.use_backend(self.name):
            return self.trainer.accuracy(self.trainer.x_train, self.trainer.t_train)


class BookLoop:
    """The body of the book's training loop as printed (ch05/train_neuralnet.py), on
    fastnet's ``numpy`` backend in float64: the book's data (``load_mnist(normalize=True,
    one_hot_label=True)``: float64 pixels in [0, 1], one-hot float64 labels), a batch
    drawn with ``np.random.choice``, ``gradient``, ``params[key] -= lr * grad[key]``, and
    ``loss = network.loss(x_batch, t_batch)`` appended to the loss list (a second
    forward pass, which the book's loop does every iteration)."""

    def __init__(self, x, t, batch_size=100, seed=0):
        require_backend("numpy")
        with fastnet.use_backend("numpy"):
            self.network = fastnet.nets.TwoLayerNet(784, 50, 10, seed=seed, dtype="float64")
        self.x_train = x / 255.0 if x.dtype == np.uint8 else np.asarray(x, dtype=np.float64)
        self.t_train = np.eye(10)[t]
        self.random = np.random.RandomState(seed)
        self.batch_size = batch_size
        self.train_loss_list = []

    def __call__(self):
        with fastnet.use_backend("numpy"):
            batch_mask = self.random.choice(self.x_train.shape[0], self.batch_size)
            x_batch = self.x_train[batch_mask]
            t_batch = self.t_train[batch_mask]
            grad = self.network.gradient(x_batch, t_batch)
            for key in ("W1", "b1", "W2", "b2"):
                self.network.params[key] -= 0.1 * grad[key]
            loss = self.network.loss(x_batch, t_batch)
            self.train_loss_list.append(loss)
            if len(self.train_loss_list) > 100_000:  # a long benchmark run: keep memory flat
                del self.train_loss_list[:50_000]


class BookStep:
    """The book's loop body: ``grad = network.gradient(x, t)``, ``optimizer.update(params,
    grad)`` (chapter 6's form; SGD is chapter 5's ``params -= lr * grad``) and, with
    ``loss_line``, ``network.loss(x, t)`` appended to a list as both chapters' loops do
    (a second forward pass), on backend ``name`` (integer labels; uint8 pixels divided by
    255 per batch).  On the reference backend this is the book's layer-by-layer code."""

    def __init__(self, name, dtype, x, t, hidden=(50,), optimizer="sgd", batch_size=100, seed=0, loss_line=False):
        from fastnet.optim import make_optimizer

        require_backend(name)
        self.name = name
        with fastnet.use_backend(name):
            self.net = fastnet.nets.MultiLayerNet(784, list(hidden), 10, seed=seed, dtype=dtype,
                                                  weight_init_std="he")
        self.optimizer = make_optimizer(optimizer, LEARNING_RATES[optimizer])
        self.x, self.t, self.dtype = x, t, np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.batch_size = batch_size
        self.loss_line, self.train_loss_list = loss_line, []

    def __call__(self):
        with fastnet.use_backend(self.name):
            idx = self.rng.integers(0, len(self.x), self.batch_size)
            x_batch = self.x[idx]
            if x_batch.dtype == np.uint8:
                x_batch = x_batch / self.dtype.type(255)
            grad = self.net.gradient(x_batch, self.t[idx])
            self.optimizer.update(self.net.params, grad)
            if self.loss_line:
                self.train_loss_list.append(self.net.loss(x_batch, self.t[idx]))
                if len(self.train_loss_list) > 100_000:  # a long benchmark run: keep memory flat
                    del self.train_loss_list[:50_000]


class TorchStep:
    """The same step in PyTorch (CPU, float32): draw, forward, backward, optimiser."""

    def __init__(self, x, t, hidden=(50,), optimizer="sgd", batch_size=100, seed=0):
        torch = try_torch()
        if torch is None:
            raise NotImplementedError("PyTorch is not installed (pip install torch==2.13.0)")
        self.torch = torch
        self.model, self.opt, self.loss_fn = torch_net(torch, seed, hidden=hidden, optimizer=optimizer)
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / np.float32(255)
                                  if x.dtype == np.uint8 else np.ascontiguousarray(x, dtype=np.float32))
        self.t = torch.from_numpy(np.asarray(t, dtype=np.int64))
        self.gen = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size

    def __call__(self):
        idx = self.torch.randint(0, len(self.x), (self.batch_size,), generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x[idx]), self.t[idx])
        loss.backward()
        self.opt.step()
        return loss


def kernel_args(name, dtype, n=100, d=784, m=50, seed=0):
    """Arguments (outputs preallocated) for one call of kernel ``name`` at MNIST sizes:
    a batch of ``n`` rows of ``d`` inputs into ``m`` units; losses use 10 classes."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)

    def arr(*shape):
        return rng.standard_normal(shape).astype(dt)

    c = 10
    labels = rng.integers(0, c, n).astype(np.int64)
    onehot = np.eye(c, dtype=dt)[labels]
    probs = np.abs(arr(n, c)) + 0.01
    probs /= probs.sum(axis=1, keepdims=True)
    x = np.ascontiguousarray(batch(dt, n, seed)[0][:, :d]) if d <= 784 else np.abs(arr(n, d))
    table = {
        "step": (arr(n, m), np.empty((n, m), dt)),
        "sigmoid": (arr(n, m), np.empty((n, m), dt)),
        "relu": (arr(n, m), np.empty((n, m), dt)),
        "sigmoid_backward": (arr(n, m), np.abs(arr(n, m)) % 1, np.empty((n, m), dt)),
        "relu_backward": (arr(n, m), arr(n, m), np.empty((n, m), dt)),
        "affine": (x, arr(d, m), arr(m), np.empty((n, m), dt)),
        "affine_relu": (x, arr(d, m), arr(m), np.empty((n, m), dt)),
        "affine_sigmoid": (x, arr(d, m), arr(m), np.empty((n, m), dt)),
        "affine_backward": (x, arr(d, m), arr(n, m), np.empty((d, m), dt), np.empty(m, dt), None),
        "softmax": (arr(n, c), np.empty((n, c), dt)),
        "cross_entropy_labels": (probs, labels),
        "cross_entropy_onehot": (probs, onehot),
        "sum_squared_error": (probs, onehot),
        "softmax_loss_labels": (arr(n, c), labels, np.empty((n, c), dt)),
        "softmax_loss_onehot": (arr(n, c), onehot, np.empty((n, c), dt)),
        "softmax_loss_backward_labels": (probs, labels, 1.0, np.empty((n, c), dt)),
        "softmax_loss_backward_onehot": (probs, onehot, 1.0, np.empty((n, c), dt)),
    }
    if name in ("train_steps_mlp", "train_steps_mlp_sparse", "mlp_gradient"):  # d-m-10, 5 SGD steps
        (X, T), _ = mnist_pixels()
        X = np.ascontiguousarray(X[:, :d])
        sizes = np.array([d, m, c])
        theta = (0.01 * rng.standard_normal(mlp_size(sizes))).astype(dt)
        if name == "mlp_gradient":
            return (X, T, rng.integers(0, len(X), n), sizes, Act.RELU, theta, 0.0, np.empty_like(theta))
        rows = mnist_csr(d) if name.endswith("sparse") else (X,)
        opt = np.array([Opt.SGD, 0.1, 0.9, 0.999, 0, 0])
        return (*rows, T, rng.integers(0, len(X), (5, n)), sizes, Act.RELU, theta, opt, np.zeros((2, theta.size), dt),
                np.empty(5))
    if name in ("predict_mlp", "sparse_predict_mlp"):  # the labels of one evaluation chunk of rows
        (X, _), _ = mnist_pixels()
        sizes = np.array([d, m, c])
        theta = (0.1 * rng.standard_normal(mlp_size(sizes))).astype(dt)
        row0 = int(rng.integers(0, len(X) - n))
        if name == "predict_mlp":
            return (np.ascontiguousarray(X[row0 : row0 + n, :d]), sizes, Act.RELU, theta, np.empty(n, np.int64))
        return (*mnist_csr(d), row0, sizes, Act.RELU, theta, np.empty(n, np.int64))
    if name == "sparse_affine":
        indptr = mnist_csr(d)[0]
        row0 = int(rng.integers(0, len(indptr) - 1 - n))
        return (*mnist_csr(d), row0, arr(d, m), arr(m), 1, np.empty((n, m), dt))
    if name == "sparse_rows":
        return (mnist_pixels()[0][0][: 10 * n, :d],)
    if name == "numerical_gradient_mlp":  # a small net: the kernel's cost grows with every parameter
        sizes = np.array([d, m, c])
        theta = (0.01 * rng.standard_normal(mlp_size(sizes))).astype(dt)
        return (x.astype(dt), labels, sizes, Act.RELU, theta, 1e-4, np.empty_like(theta))
    return table[name]


def reference_numgrad_seconds(x, t, sizes, theta, sample: int = 400, seed: int = 0) -> float:
    """Seconds the book's loop (two full forward passes per parameter, the reference
    kernel's loss) needs for the whole numerical gradient of a net of layer ``sizes``,
    timed on ``sample`` random parameters and scaled to every parameter: each parameter
    costs the loop the same two passes."""
    import time

    loss = backend.load("numpy")._mlp_loss
    sizes = np.asarray(sizes)
    picks = np.random.default_rng(seed).choice(theta.size, min(sample, theta.size), replace=False)
    start = time.perf_counter()
    for i in picks:
        tmp = theta[i]
        theta[i] = tmp + 1e-4
        loss(x, t, sizes, Act.RELU, theta)
        theta[i] = tmp - 1e-4
        loss(x, t, sizes, Act.RELU, theta)
        theta[i] = tmp
    return (time.perf_counter() - start) / len(picks) * theta.size
