"""The numerical gradient: the book's loop against the network-aware kernels."""

import time

import numpy as np

import fastnet
import fastnet.nets
from fastnet.gradient import gradcheck
from fastnet.kernels.contract import Act, mlp_size

from .common import BACKENDS, OnBackend, batch, reference_numgrad_seconds, require_backend

#: layer sizes of each case; "small" is small enough for the reference loop in asv's time
SIZES = {"small": (100, 20, 10), "784-50-10": (784, 50, 10), "784-100-100-10": (784, 100, 100, 10)}


def _setup(size):
    sizes = np.array(SIZES[size])
    if size == "small":
        x, t = batch(np.float64, 20)
        x = np.ascontiguousarray(x[:, 300:400])
    else:
        x, t = batch(np.float64, 100)
    theta = 0.1 * np.random.default_rng(0).standard_normal(mlp_size(sizes))
    return x, t, sizes, int(Act.RELU), theta, 1e-4, np.empty_like(theta)  # numerical_gradient_mlp's arguments


class NumericalGradient:
    params = (BACKENDS, list(SIZES))
    param_names = ["backend", "net"]
    timeout = 120

    def setup(self, backend, net):
        if backend == "numpy" and net != "small":
            raise NotImplementedError("the book's loop takes minutes here: see NumericalGradientSpeedup")
        self.k = require_backend(backend)
        self.args = _setup(net)
        self.time_gradient(backend, net)

    def time_gradient(self, backend, net):
        self.k.numerical_gradient_mlp(*self.args)


class NumericalGradientSpeedup:
    """The whole gradient of a net on 100 MNIST images in float64 against the book's loop
    (timed on 200 parameters and scaled to all of them: see ``reference_numgrad_seconds``)."""

    params = (["numba", "cython"], ["784-50-10", "784-100-100-10"])
    param_names = ["backend", "net"]
    unit = "times faster"
    timeout = 300

    def setup(self, backend, net):
        self.k = require_backend(backend)
        self.args = _setup(net)
        self.k.numerical_gradient_mlp(*self.args)

    def track_speedup(self, backend, net):
        x, t, sizes, _, theta, _, _ = self.args
        reference = reference_numgrad_seconds(x, t, sizes, theta, sample=200)
        start = time.perf_counter()
        self.k.numerical_gradient_mlp(*self.args)
        return reference / (time.perf_counter() - start)


class Gradcheck(OnBackend):
    def setup(self):
        self.activate("cython")
        self.x, self.t = batch(np.float64)
        self.net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0)
        gradcheck(self.net, self.x[:5], self.t[:5])

    def time_gradcheck(self):
        gradcheck(self.net, self.x, self.t)
