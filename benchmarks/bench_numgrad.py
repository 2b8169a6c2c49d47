"""The numerical gradient: the book's loop against the network-aware kernels."""

import time

import numpy as np

import fastnet
import fastnet.nets
from fastnet.gradient import gradcheck

from .common import BACKENDS, batch, reference_numgrad_seconds, require_backend


def _setup(size):
    rng = np.random.default_rng(0)
    if size == "mnist":
        d, h, n = 784, 50, 100
        x, t = batch(np.float64, n)
    else:  # small enough for the reference loop to run in asv's time
        d, h, n = 100, 20, 20
        x, t = batch(np.float64, n)
        x = np.ascontiguousarray(x[:, 300:400])
    params = [(0.01 * rng.standard_normal(s)) for s in ((d, h), (h,), (h, 10), (10,))]
    grads = [np.empty_like(p) for p in params]
    return x, t, params, grads


class NumericalGradient:
    params = (BACKENDS, ["small", "mnist"])
    param_names = ["backend", "size"]
    timeout = 120

    def setup(self, backend, size):
        if backend == "numpy" and size == "mnist":
            raise NotImplementedError("the book's loop takes ~15 s here: see track_speedup")
        self.k = require_backend(backend)
        self.args = _setup(size)
        self.time_gradient(backend, size)

    def time_gradient(self, backend, size):
        x, t, params, grads = self.args
        self.k.numerical_gradient_2layer(x, t, *params, 1, 1e-4, *grads)


class NumericalGradientSpeedup:
    """Full 784-50-10 gradient against the book's loop (timed on 200 parameters and
    scaled to all 39,760: see ``reference_numgrad_seconds``)."""

    params = (["numba", "cython"],)
    param_names = ["backend"]
    unit = "times faster"
    timeout = 120

    def setup(self, backend):
        self.k = require_backend(backend)
        self.args = _setup("mnist")
        x, t, params, grads = self.args
        self.k.numerical_gradient_2layer(x, t, *params, 1, 1e-4, *grads)

    def track_speedup(self, backend):
        x, t, params, grads = self.args
        reference = reference_numgrad_seconds(x, t, params, sample=200)
        start = time.perf_counter()
        self.k.numerical_gradient_2layer(x, t, *params, 1, 1e-4, *grads)
        return reference / (time.perf_counter() - start)


class Gradcheck:
    def setup(self):
        require_backend("cython")
        self.x, self.t = batch(np.float64)
        with fastnet.use_backend("cython"):
            self.net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0)
            gradcheck(self.net, self.x[:5], self.t[:5])

    def time_gradcheck(self):
        with fastnet.use_backend("cython"):
            gradcheck(self.net, self.x, self.t)
