"""The book's layers (chapter 5, ``common/layers.py``) on the active kernel table.

``MulLayer`` and ``AddLayer`` are the scalar nodes of the apple-shopping graphs;
``Relu``, ``Sigmoid``, ``Affine`` and ``SoftmaxWithLoss`` are the network layers.
Each has ``forward`` and ``backward(dout)`` called exactly as the book calls them, and
keeps the same state (``Affine.x``, ``.dW``, ``.db``; ``Sigmoid.out``; ``Relu.mask``;
``SoftmaxWithLoss.y``, ``.t``, ``.loss``).  The work is done by the active backend's
kernels; every call returns fresh arrays, so results kept by the caller stay valid.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array, labels
from ._validate import rows_view as _rows
from .backend import kernels

__all__ = ["MulLayer", "AddLayer", "Relu", "Sigmoid", "Affine", "SoftmaxWithLoss"]


class MulLayer:
    """``out = x * y``; backward swaps the inputs: ``dx = dout * y``, ``dy = dout * x``."""

    def __init__(self):
        self.x = None
        self.y = None

    def forward(self, x, y):
        self.x = x
        self.y = y
        return x * y

    def backward(self, dout):
        dx = dout * self.y
        dy = dout * self.x
        return dx, dy


class AddLayer:
    """``out = x + y``; backward passes ``dout`` to both inputs."""

    def __init__(self):
        pass

    def forward(self, x, y):
        return x + y

    def backward(self, dout):
        return dout * 1, dout * 1


class _Activation:
    """Shared shape handling: element-wise kernels see a 2-D view of any input."""

    forward_kernel = backward_kernel = ""

    def __init__(self):
        self.out = None

    def forward(self, x):
        x = as_float_array(x)
        out = np.empty(x.shape, x.dtype)
        getattr(kernels(), self.forward_kernel)(_rows(x), _rows(out))
        self.out = out
        return out

    def backward(self, dout):
        dout = as_float_array(dout, "dout", dtype=self.out.dtype)
        if dout.shape != self.out.shape:
            raise ValueError(f"dout has shape {dout.shape} but forward's output has {self.out.shape}")
        dx = np.empty(dout.shape, dout.dtype)
        getattr(kernels(), self.backward_kernel)(_rows(dout), _rows(self.out), _rows(dx))
        return dx


class Relu(_Activation):
    """ReLU.  ``mask`` (where ``x <= 0``) is derived from the saved output."""

    forward_kernel, backward_kernel = "relu", "relu_backward"

    @property
    def mask(self):
        return None if self.out is None else self.out <= 0


class Sigmoid(_Activation):
    """Sigmoid; backward uses the saved output: ``dout * (1 - out) * out``."""

    forward_kernel, backward_kernel = "sigmoid", "sigmoid_backward"


class Affine:
    """``out = x @ W + b`` for a batch ``x`` of any shape ``(N, ...)`` (flattened per row).

    ``backward`` keeps ``dW`` and ``db`` and returns ``dx`` in ``x``'s original shape;
    ``backward(dout, need_dx=False)`` skips the ``dx`` product (a net's first layer).
    ``forward(x, kernel="affine_relu")`` (or ``"affine_sigmoid"``) lets a net fuse the
    activation layer that follows into the same pass over the output.
    """

    def __init__(self, W, b):
        self.W = W
        self.b = b
        self.x = None
        self.original_x_shape = None
        self.dW = None
        self.db = None

    def _input(self, x) -> np.ndarray:
        x = as_float_array(x, dtype=self.W.dtype)
        if x.ndim == 0:
            raise ValueError("Affine needs a batch of inputs, got a scalar")
        x2 = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
        if x2.shape[1] != self.W.shape[0]:
            raise ValueError(
                f"Affine got input of shape {x.shape} ({x2.shape[1]} features per row) "
                f"but W has shape {self.W.shape}"
            )
        self.original_x_shape = x.shape
        self.x = x2
        return x2

    def forward(self, x, kernel: str = "affine"):
        x = self._input(x)
        out = np.empty((x.shape[0], self.W.shape[1]), self.W.dtype)
        getattr(kernels(), kernel)(x, self.W, self.b, out)
        return out

    def backward(self, dout, need_dx: bool = True):
        dout = as_float_array(dout, "dout", dtype=self.W.dtype)
        if dout.shape != (self.x.shape[0], self.W.shape[1]):
            raise ValueError(
                f"dout has shape {dout.shape}, expected {(self.x.shape[0], self.W.shape[1])}"
            )
        self.dW = np.empty(self.W.shape, self.W.dtype)
        self.db = np.empty(self.b.shape, self.b.dtype)
        dx = np.empty(self.x.shape, self.W.dtype) if need_dx else None
        kernels().affine_backward(self.x, self.W, dout, self.dW, self.db, dx)
        if dx is None:
            return None
        return dx.reshape(*self.original_x_shape)


class SoftmaxWithLoss:
    """Softmax followed by cross-entropy; backward gives ``(y - t) * dout / N``.

    ``t`` is one-hot (the scores' shape) or integer labels (one per row).  The book's
    backward ignores ``dout`` (it is always 1 there); fastnet multiplies by it.
    """

    def __init__(self):
        self.loss = None
        self.y = None  # softmax output
        self.t = None  # labels
        self._onehot = False

    def forward(self, x, t):
        x = as_float_array(x)
        squeeze = x.ndim == 1
        if squeeze:
            x = x.reshape(1, -1)
        if x.ndim != 2:
            raise ValueError(f"SoftmaxWithLoss needs scores of shape (N, classes), got {x.shape}")
        t = np.asarray(t)
        if squeeze and t.ndim == 0:
            t = t.reshape(1)
        elif squeeze and t.ndim == 1 and t.size == x.size:
            t = t.reshape(1, -1)
        y = np.empty(x.shape, x.dtype)
        k = kernels()
        if t.ndim == 2:
            if t.shape != x.shape:
                raise ValueError(f"one-hot labels t have shape {t.shape} but the scores have {x.shape}")
            t = as_float_array(t, "t", dtype=x.dtype)
            self.loss = k.softmax_loss_onehot(x, t, y)
            self._onehot = True
        else:
            t = labels(t, x.shape[0], x.shape[1])
            self.loss = k.softmax_loss_labels(x, t, y)
            self._onehot = False
        # backward() must see the labels this loss was computed with, whatever the
        # caller does to its array in between: keep a copy of our own
        self.y, self.t = y, t.copy()
        return self.loss

    def backward(self, dout=1):
        dx = np.empty(self.y.shape, self.y.dtype)
        k = kernels()
        if self._onehot:
            k.softmax_loss_backward_onehot(self.y, self.t, float(dout), dx)
        else:
            k.softmax_loss_backward_labels(self.y, self.t, float(dout), dx)
        return dx
