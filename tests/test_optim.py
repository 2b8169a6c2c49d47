"""The optimisers against the book's code (common/optimizer.py), step by step, exactly."""

import numpy as np
import pytest

from fastnet.optim import SGD, AdaGrad, Adam, Momentum, make_optimizer


class BookMomentum:
    def __init__(self, lr, momentum=0.9):
        self.lr, self.momentum, self.v = lr, momentum, None

    def update(self, params, grads):
        if self.v is None:
            self.v = {key: np.zeros_like(val) for key, val in params.items()}
        for key in params:
            self.v[key] = self.momentum * self.v[key] - params[key].dtype.type(self.lr) * grads[key]
            params[key] += self.v[key]


class BookAdaGrad:
    def __init__(self, lr):
        self.lr, self.h = lr, None

    def update(self, params, grads):
        if self.h is None:
            self.h = {key: np.zeros_like(val) for key, val in params.items()}
        for key in params:
            self.h[key] += grads[key] * grads[key]
            params[key] -= params[key].dtype.type(self.lr) * grads[key] / (np.sqrt(self.h[key]) + 1e-7)


class BookAdam:
    def __init__(self, lr, beta1=0.9, beta2=0.999):
        self.lr, self.beta1, self.beta2, self.iter, self.m, self.v = lr, beta1, beta2, 0, None, None

    def update(self, params, grads):
        if self.m is None:
            self.m = {key: np.zeros_like(val) for key, val in params.items()}
            self.v = {key: np.zeros_like(val) for key, val in params.items()}
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)
        for key in params:
            self.m[key] += (1 - self.beta1) * (grads[key] - self.m[key])
            self.v[key] += (1 - self.beta2) * (grads[key] ** 2 - self.v[key])
            params[key] -= params[key].dtype.type(lr_t) * self.m[key] / (np.sqrt(self.v[key]) + 1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [lambda: (Momentum(0.05), BookMomentum(0.05)), lambda: (Adam(0.01), BookAdam(0.01)),
                                  lambda: (AdaGrad(0.05), BookAdaGrad(0.05))],
                         ids=["momentum", "adam", "adagrad"])
def test_same_bits_as_the_book(dtype, make):
    ours, book = make()
    rng = np.random.default_rng(0)
    shapes = {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
    a = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    b = {k: v.copy() for k, v in a.items()}
    for _ in range(6):
        grads = {k: (rng.standard_normal(s) * rng.choice([1e-4, 1.0, 50.0])).astype(dtype) for k, s in shapes.items()}
        ours.update(a, grads)
        book.update(b, {k: g.copy() for k, g in grads.items()})
    for k in shapes:
        assert a[k].dtype == dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sgd_and_names():
    p = {"W": np.ones(3, np.float32)}
    SGD(0.5).update(p, {"W": np.full(3, 2, np.float32)})
    np.testing.assert_array_equal(p["W"], np.zeros(3, np.float32))
    assert isinstance(make_optimizer("Adam"), Adam) and make_optimizer("momentum", 0.2).lr == 0.2
    assert isinstance(make_optimizer("adagrad"), AdaGrad) and make_optimizer("adagrad").lr == 0.01
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("rmsprop")
    with pytest.raises(ValueError, match="positive"):
        SGD(0)
