"""Optimisers: the book's SGD, plus Momentum, AdaGrad and Adam (chapter 6 of the book).

Each updates a dict of parameter arrays in place from a dict of gradients, as the
book's ``optimizer.update(params, grads)`` does.
"""

from __future__ import annotations

import numpy as np

from .kernels.contract import Opt

__all__ = ["SGD", "Momentum", "AdaGrad", "Adam", "make_optimizer"]


class SGD:
    """``W -= lr * dW``."""

    name = "sgd"
    #: the MLP engine's code for this optimiser (contract.Opt)
    kind = Opt.SGD
    #: the attributes that hold its state, one dict of arrays each (as the book's)
    state_names: tuple = ()

    def __init__(self, lr: float = 0.01):
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.lr = float(lr)

    def record(self, decay: float = 0.0) -> np.ndarray:
        """The engine's ``opt`` record of this optimiser now (kernels/contract.py)."""
        return np.array([self.kind, self.lr, getattr(self, "momentum", getattr(self, "beta1", 0.0)),
                         getattr(self, "beta2", 0.0), decay, getattr(self, "iter", 0)], dtype=np.float64)

    def bind_state(self, state, views) -> None:
        """Keep this optimiser's state in the rows of ``state`` (the engine's (2, P)
        array): each state dict becomes ``views(state[row])``, with the values it held
        (zeros for a fresh optimiser), so the engine and :meth:`update` share it."""
        for row, name in enumerate(self.state_names):
            new, old = views(state[row]), getattr(self, name)
            for key, value in new.items():
                value[...] = 0 if old is None else old[key]
            setattr(self, name, new)

    def update(self, params, grads):
        for key, grad in grads.items():
            params[key] -= params[key].dtype.type(self.lr) * grad


class Momentum(SGD):
    """``v = momentum * v - lr * dW;  W += v``."""

    name = "momentum"
    kind = Opt.MOMENTUM
    state_names = ("v",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.9):
        super().__init__(lr)
        self.momentum = float(momentum)
        self.v = self._t = None

    def update(self, params, grads):
        if self.v is None:
            self.v = {key: np.zeros_like(value) for key, value in params.items()}
        if self._t is None:
            self._t = {key: np.empty_like(value) for key, value in params.items()}
        for key, grad in grads.items():
            v, t = self.v[key], self._t[key]
            v *= self.momentum
            np.multiply(grad, params[key].dtype.type(self.lr), out=t)  # lr * dW, in place
            v -= t
            params[key] += v


class AdaGrad(SGD):
    """``h += dW * dW;  W -= lr * dW / (sqrt(h) + 1e-7)``, as the book writes it."""

    name = "adagrad"
    kind = Opt.ADAGRAD
    state_names = ("h",)

    def __init__(self, lr: float = 0.01):
        super().__init__(lr)
        self.h = self._t = None

    def update(self, params, grads):
        """The book's two lines into one scratch array per parameter: the same operations
        in the same order, so the same bits (tests/test_optim.py)."""
        if self.h is None:
            self.h = {key: np.zeros_like(value) for key, value in params.items()}
        if self._t is None:
            self._t = {key: np.empty_like(value) for key, value in params.items()}
        for key, grad in grads.items():
            h, t = self.h[key], self._t[key]
            np.multiply(grad, grad, out=t)
            h += t
            np.sqrt(h, out=t)
            t += 1e-7
            np.divide(np.multiply(grad, params[key].dtype.type(self.lr)), t, out=t)
            params[key] -= t


class Adam(SGD):
    """Adam (Kingma & Ba), written as the book's ``common/optimizer.py`` does."""

    name = "adam"

    kind = Opt.ADAM
    state_names = ("m", "v")

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999):
        super().__init__(lr)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.iter = 0
        self.m = self.v = self._t = self._u = None

    def update(self, params, grads):
        """The book's three lines, each operation into two scratch arrays per parameter
        instead of a new temporary: the same operations in the same order on the same
        values, so the same bits (tests/test_optim.py)."""
        if self.m is None:
            self.m = {key: np.zeros_like(value) for key, value in params.items()}
            self.v = {key: np.zeros_like(value) for key, value in params.items()}
        if self._t is None:
            self._t = {key: np.empty_like(value) for key, value in params.items()}
            self._u = {key: np.empty_like(value) for key, value in params.items()}
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)
        for key, grad in grads.items():
            m, v, t, u = self.m[key], self.v[key], self._t[key], self._u[key]
            np.subtract(grad, m, out=t)  # m += (1 - beta1) * (grad - m)
            t *= 1 - self.beta1
            m += t
            np.multiply(grad, grad, out=t)  # v += (1 - beta2) * (grad**2 - v)
            t -= v
            t *= 1 - self.beta2
            v += t
            np.multiply(m, params[key].dtype.type(lr_t), out=u)  # W -= lr_t * m / (sqrt(v) + 1e-7)
            np.sqrt(v, out=t)
            t += 1e-7
            np.divide(u, t, out=u)
            params[key] -= u


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adagrad": AdaGrad, "adam": Adam}


def in_engine(optimizer) -> bool:
    """Whether the MLP engine applies ``optimizer`` inside its kernels: one of the four
    above exactly (a subclass may change ``update``; it gets the gradients instead)."""
    return type(optimizer) in OPTIMIZERS.values()


def make_optimizer(optimizer, lr=None):
    """An optimiser object from a name ('sgd', 'momentum', 'adagrad', 'adam') or an object
    with ``update``."""
    if hasattr(optimizer, "update"):
        return optimizer
    key = str(optimizer).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key]() if lr is None else OPTIMIZERS[key](lr)
