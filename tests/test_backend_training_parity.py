"""TwoLayerNet trained 200 steps on the same seed and batches: same losses on every backend."""

import numpy as np
import pytest

import fastnet
from fastnet.nets import TwoLayerNet


def _train(backend_name, dtype, steps=200):
    data = np.random.default_rng(0)
    x = (data.random((1000, 784)) * (data.random((1000, 784)) > 0.8)).astype(dtype)
    t = data.integers(0, 10, 1000)
    order = np.random.default_rng(1)
    losses = []
    with fastnet.use_backend(backend_name):
        net = TwoLayerNet(784, 50, 10, seed=2, dtype=dtype)
        for _ in range(steps):
            idx = order.choice(1000, 100)
            grads = net.gradient(x[idx], t[idx])
            for key in net.params:
                net.params[key] -= dtype(0.1) * grads[key]
            losses.append(net.lastLayer.loss)
    return np.array(losses), net.params


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
def test_same_losses_on_every_backend(dtype, rtol):
    ref_losses, ref_params = _train("numpy", dtype)
    assert ref_losses[-1] < ref_losses[0]
    for name in ("numba", "cython"):
        losses, params = _train(name, dtype)
        np.testing.assert_allclose(losses, ref_losses, rtol=rtol, err_msg=name)
        for key in params:
            np.testing.assert_allclose(params[key], ref_params[key], rtol=rtol * 10, atol=rtol, err_msg=f"{name} {key}")
