"""The book's functions (``common/functions.py``), running on the active backend.

Same names and results as the book: ``step_function``, ``sigmoid``, ``relu``,
``identity_function``, ``softmax``, ``sum_squared_error``, ``cross_entropy_error``,
``sigmoid_grad``, ``relu_grad``.  Inputs may be scalars, lists or arrays of any
shape; 2-D data are rows (a batch), and ``softmax`` works along the last axis.
Integer inputs are computed in float64, like NumPy does in the book's code.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array, labels
from ._validate import rows_view as _rows
from .backend import kernels

__all__ = [
    "identity_function",
    "step_function",
    "sigmoid",
    "sigmoid_grad",
    "relu",
    "relu_grad",
    "softmax",
    "sum_squared_error",
    "cross_entropy_error",
]


def _elementwise(kernel_name: str, x) -> np.ndarray:
    x = as_float_array(x)
    out = np.empty(x.shape, x.dtype)
    getattr(kernels(), kernel_name)(_rows(x), _rows(out))
    return out


def identity_function(x):
    """The output activation of regression: returns ``x`` unchanged."""
    return x


def step_function(x):
    """1 where ``x > 0`` else 0, as an integer array (the book's ``dtype=int``)."""
    return _elementwise("step", x).astype(int)


def sigmoid(x):
    """``1 / (1 + exp(-x))``; no overflow warning for very negative ``x``."""
    return _elementwise("sigmoid", x)


def relu(x):
    """``max(0, x)``."""
    return _elementwise("relu", x)


def sigmoid_grad(x):
    """Derivative of the sigmoid at ``x``: ``(1 - sigmoid(x)) * sigmoid(x)``."""
    y = sigmoid(x)
    out = np.empty_like(y)
    kernels().sigmoid_backward(_rows(np.ones_like(y)), _rows(y), _rows(out))
    return out


def relu_grad(x):
    """The book's ReLU derivative: 1 where ``x >= 0`` else 0 (1 at exactly 0, as written there).

    The ``Relu`` layer's backward, like the book's layer, passes nothing where ``x <= 0``.
    """
    x = as_float_array(x)
    return (x >= 0).astype(x.dtype)


def softmax(x):
    """Softmax along the last axis, subtracting the maximum first (no overflow)."""
    x = as_float_array(x)
    out = np.empty(x.shape, x.dtype)
    if x.size:
        kernels().softmax(_rows(x), _rows(out))
    return out


def sum_squared_error(y, t):
    """``0.5 * sum((y - t) ** 2)`` over all elements (the book does not average)."""
    y = as_float_array(y, "y")
    t = as_float_array(t, "t", dtype=y.dtype)
    if y.shape != t.shape:
        raise ValueError(f"y has shape {y.shape} but t has shape {t.shape}")
    return kernels().sum_squared_error(_rows(y), _rows(t))


def cross_entropy_error(y, t):
    """Mean cross-entropy of probabilities ``y`` against labels ``t``.

    ``y`` is one sample (1-D) or a batch (2-D).  ``t`` is one-hot (same shape as
    ``y``) or integer class labels (one per row).  ``1e-7`` is added inside the log.
    """
    y = as_float_array(y, "y")
    t = np.asarray(t)
    if y.ndim == 1:
        y = y.reshape(1, -1)
        t = t.reshape(1, -1) if t.size == y.size else t.reshape(1)
    if y.ndim != 2:
        raise ValueError(f"y must be 1-D or 2-D, got shape {y.shape}")
    if t.shape == y.shape:
        return kernels().cross_entropy_onehot(y, as_float_array(t, "t", dtype=y.dtype))
    if t.ndim == 2:
        raise ValueError(f"one-hot labels t have shape {t.shape} but y has shape {y.shape}")
    return kernels().cross_entropy_labels(y, labels(t, y.shape[0], y.shape[1]))
