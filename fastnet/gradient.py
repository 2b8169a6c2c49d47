"""Numerical differentiation, as in chapter 4 (``common/gradient.py``).

``numerical_diff`` and ``numerical_gradient`` are the central difference with
``h = 1e-4``; ``gradient_descent`` is the book's loop.  ``numerical_gradient`` works
on arrays of any shape and puts every element of ``x`` back, also when ``f`` raises.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array

H = 1e-4

__all__ = ["numerical_diff", "numerical_gradient", "gradient_descent"]


def numerical_diff(f, x, h: float = H):
    """Central difference ``(f(x + h) - f(x - h)) / 2h``."""
    return (f(x + h) - f(x - h)) / (2 * h)


def _scalar(value, where: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"f must return a scalar, but returned shape {arr.shape} {where}")
    return float(arr.reshape(()))


def numerical_gradient(f, x, h: float = H):
    """Gradient of scalar ``f`` at ``x`` by central differences, one element at a time.

    ``x`` is perturbed in place (``f`` may ignore its argument and read ``x`` through
    a closure, as the book's nets do) and every element is restored afterwards, also
    when ``f`` raises.  ``x`` must be a float array; lists are converted first.
    """
    if not isinstance(x, np.ndarray):
        x = as_float_array(x)
    elif x.dtype.kind != "f":
        raise TypeError(
            f"numerical_gradient perturbs x in place, so x must be a float array; got {x.dtype}"
        )
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        idx = it.multi_index
        tmp_val = x[idx]
        try:
            x[idx] = tmp_val + h
            fxh1 = _scalar(f(x), f"at x[{idx}] + h")
            x[idx] = tmp_val - h
            fxh2 = _scalar(f(x), f"at x[{idx}] - h")
        finally:
            x[idx] = tmp_val
        grad[idx] = (fxh1 - fxh2) / (2 * h)
        it.iternext()
    return grad


def gradient_descent(f, init_x, lr: float = 0.01, step_num: int = 100, *, return_history=False):
    """``step_num`` steps of ``x -= lr * numerical_gradient(f, x)`` from ``init_x``.

    Unlike the book, ``init_x`` itself is not modified: the walk starts from a copy.
    With ``return_history=True`` returns ``(x, history)`` like the book's
    ``gradient_method.py`` (the points before each step, shape ``(step_num, *x.shape)``).
    """
    x = np.array(as_float_array(init_x, "init_x"), copy=True)
    history = []
    for _ in range(int(step_num)):
        if return_history:
            history.append(x.copy())
        x -= lr * numerical_gradient(f, x)
    if return_history:
        return x, np.array(history).reshape((len(history),) + x.shape)
    return x
