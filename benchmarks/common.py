"""Shared set-up for the asv suites and the report: data, nets, thread counts, PyTorch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import fastnet
import fastnet.nets
from fastnet import backend

BACKENDS = ("numpy", "numba", "cython")
DTYPES = ("float32", "float64")
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def require_backend(name: str):
    """asv convention: a combination that cannot run raises NotImplementedError in setup."""
    why = backend.why_unavailable(name)
    if why:
        raise NotImplementedError(why)
    return backend.load(name)


def mnist_pixels(n_train=None):
    """Real MNIST as uint8 (from FASTNET_DATA, ../shared/data or the cache) or, when it
    is not there, synthetic digits with MNIST's shape and sparsity (19% non-zero)."""
    from fastnet.datasets import DatasetError, load_mnist

    data_dir = os.environ.get("FASTNET_DATA") or (SHARED if SHARED.exists() else None)
    try:
        (x, t), (xt, tt) = load_mnist(normalize=False, data_dir=data_dir, download=False, progress=False)
    except DatasetError:
        rng = np.random.default_rng(0)
        x = (rng.random((60000, 784)) * 255 * (rng.random((60000, 784)) < 0.19)).astype(np.uint8)
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


def torch_net(torch, seed=0, dtype="float32", hidden=50):
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    ).to(dt)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss()


class FusedStep:
    """One call of a backend's ``train_step_2layer`` on MNIST rows (uint8 pixels), or of
    ``train_step_2layer_sparse`` on the same rows as CSR when ``sparse``.  With
    ``steps`` > 1, one call runs that many steps through ``train_steps_2layer[_sparse]``
    (as ``fastnet train`` does with plain SGD); time per step = time per call / steps."""

    def __init__(self, name, dtype, x, t, batch_size=100, hidden=50, seed=0, sparse=False, steps=1):
        self.k = require_backend(name)
        self.steps = int(steps)
        if self.steps > 1:
            self.step = self.k.train_steps_2layer_sparse if sparse else self.k.train_steps_2layer
            self.losses = np.empty(self.steps)
        else:
            self.step = self.k.train_step_2layer_sparse if sparse else self.k.train_step_2layer
        self.rows = self.k.sparse_rows(x) if sparse else (x,)
        self.net = fastnet.nets.TwoLayerNet(784, hidden, 10, seed=seed, dtype=dtype)
        p = self.net.params
        self.params = (p["W1"], p["b1"], p["W2"], p["b2"])
        self.x, self.t = x, t
        B, D, H, C = batch_size, 784, hidden, 10
        self.work = tuple(np.empty(s, dtype) for s in ((B, D), (B, H), (B, C), (B, H), (D, H), (H,), (H, C), (C,)))
        self.rng = np.random.default_rng(seed)
        self.batch_size = batch_size

    def __call__(self):
        if self.steps > 1:
            idx = self.rng.integers(0, len(self.x), (self.steps, self.batch_size))
            return self.step(*self.rows, self.t, idx, *self.params, 0.1, 1, self.work, self.losses)
        idx = self.rng.integers(0, len(self.x), self.batch_size)
        return self.step(*self.rows, self.t, idx, *self.params, 0.1, 1, self.work)


class EpochEvaluation:
    """The Trainer's accuracy over the 60,000 training images on backend ``name``, as after
    every epoch of ``fastnet train`` (uint8 pixels, float32 784-50-10; compiled backends:
    CSR rows, one sparse_predict_2layer call; numpy: the dense forward in chunks)."""

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
    """The book's loop body without its loss line: ``gradient`` through the layers, then
    ``params -= lr * grad`` (integer labels; uint8 pixels divided by 255 per batch)."""

    def __init__(self, name, dtype, x, t, batch_size=100, seed=0):
        require_backend(name)
        self.name = name
        with fastnet.use_backend(name):
            self.net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=seed, dtype=dtype)
        self.x, self.t, self.dtype = x, t, np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.batch_size = batch_size

    def __call__(self):
        with fastnet.use_backend(self.name):
            idx = self.rng.integers(0, len(self.x), self.batch_size)
            x_batch = self.x[idx]
            if x_batch.dtype == np.uint8:
                x_batch = x_batch / self.dtype.type(255)
            grad = self.net.gradient(x_batch, self.t[idx])
            for key in ("W1", "b1", "W2", "b2"):
                self.net.params[key] -= 0.1 * grad[key]


class TorchStep:
    """The same step in PyTorch (CPU, float32, SGD)."""

    def __init__(self, x, t, batch_size=100, seed=0):
        torch = try_torch()
        if torch is None:
            raise NotImplementedError("PyTorch is not installed (pip install torch==2.13.0)")
        self.torch = torch
        self.model, self.opt, self.loss_fn = torch_net(torch, seed)
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
    if name == "train_step_2layer":
        (X, T), _ = mnist_pixels()
        X = np.ascontiguousarray(X[:, :d])
        W = [(0.01 * rng.standard_normal(s)).astype(dt) for s in ((d, m), (m,), (m, c), (c,))]
        work = tuple(np.empty(s, dt) for s in ((n, d), (n, m), (n, c), (n, m), (d, m), (m,), (m, c), (c,)))
        return (X, T, rng.integers(0, len(X), n), *W, 0.1, 1, work)
    if name == "train_step_2layer_sparse":
        (X, T), _ = mnist_pixels()
        W = [(0.01 * rng.standard_normal(s)).astype(dt) for s in ((d, m), (m,), (m, c), (c,))]
        work = tuple(np.empty(s, dt) for s in ((n, d), (n, m), (n, c), (n, m), (d, m), (m,), (m, c), (c,)))
        return (*mnist_csr(d), T, rng.integers(0, len(X), n), *W, 0.1, 1, work)
    if name in ("train_steps_2layer", "train_steps_2layer_sparse"):  # 5 steps of the single step
        single = kernel_args(name.replace("steps", "step"), dtype, n, d, m, seed)
        # single: (*rows, T, idx, W1, b1, W2, b2, lr, act, work)
        T = single[-9]
        return (*single[:-9], T, rng.integers(0, len(T), (5, n)), *single[-7:], np.empty(5))
    if name == "sparse_affine":
        indptr = mnist_csr(d)[0]
        row0 = int(rng.integers(0, len(indptr) - 1 - n))
        return (*mnist_csr(d), row0, arr(d, m), arr(m), 1, np.empty((n, m), dt))
    if name == "sparse_predict_2layer":  # the labels of one evaluation chunk of rows
        indptr = mnist_csr(d)[0]
        row0 = int(rng.integers(0, len(indptr) - 1 - n))
        W = [(0.1 * rng.standard_normal(s)).astype(dt) for s in ((d, m), (m,), (m, c), (c,))]
        return (*mnist_csr(d), row0, *W, 1, np.empty(n, np.int64))
    if name == "sparse_rows":
        return (mnist_pixels()[0][0][: 10 * n, :d],)
    if name == "numerical_gradient_2layer":
        W = [(0.01 * rng.standard_normal(s)).astype(dt) for s in ((d, m), (m,), (m, c), (c,))]
        return (x.astype(dt), labels, *W, 1, 1e-4, *[np.empty_like(w) for w in W])
    return table[name]


def reference_numgrad_seconds(x, t, params, sample: int = 400, seed: int = 0) -> float:
    """Seconds the book's loop (two full forward passes per parameter, the reference
    kernel's loss) needs for the whole numerical gradient of a two-layer net, timed on
    ``sample`` random first-layer weights and scaled to every parameter: each parameter
    costs the loop the same two passes."""
    import time

    loss = backend.load("numpy")._loss_2layer
    flat = params[0].reshape(-1)
    picks = np.random.default_rng(seed).choice(flat.size, min(sample, flat.size), replace=False)
    start = time.perf_counter()
    for i in picks:
        tmp = flat[i]
        flat[i] = tmp + 1e-4
        loss(x, t, *params, 1)
        flat[i] = tmp - 1e-4
        loss(x, t, *params, 1)
        flat[i] = tmp
    per_param = (time.perf_counter() - start) / len(picks)
    return per_param * sum(p.size for p in params)
