"""The Numba backend: a flat module of small ``@njit(cache=True)`` kernels.

Compiled lazily on first call for each dtype (``warmup()`` compiles the common
signatures up front) and cached on disk next to this file, so a second process
loads machine code instead of compiling.  No fast-math: NaN and inf stay visible.
Matrix products use ``np.dot`` with an ``out`` array, which Numba sends to BLAS
(through SciPy); the loops around them fuse the bias, the activation and the
reductions so that nothing is allocated.

Each public name is a thin Python wrapper that checks dtypes and shapes and makes
strided inputs contiguous, then calls the jitted ``_name`` function.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import _checks as chk
from .contract import LOG_EPS

NAME = "numba"

jit = njit(cache=True, nogil=True)


# ------------------------------------------------------------------ jitted kernels
@jit
def _step(x, out):
    xf, of = x.reshape(-1), out.reshape(-1)
    for i in range(xf.size):
        of[i] = 1 if xf[i] > 0 else 0


@jit
def _sigmoid(x, out):
    xf, of = x.reshape(-1), out.reshape(-1)
    for i in range(xf.size):
        of[i] = 1 / (1 + np.exp(-xf[i]))


@jit
def _relu(x, out):
    xf, of = x.reshape(-1), out.reshape(-1)
    for i in range(xf.size):
        v = xf[i]
        of[i] = 0 if v <= 0 else v


@jit
def _sigmoid_backward(dout, y, out):
    df, yf, of = dout.reshape(-1), y.reshape(-1), out.reshape(-1)
    for i in range(df.size):
        of[i] = df[i] * (1 - yf[i]) * yf[i]


@jit
def _relu_backward(dout, y, out):
    df, yf, of = dout.reshape(-1), y.reshape(-1), out.reshape(-1)
    for i in range(df.size):
        of[i] = 0 if yf[i] <= 0 else df[i]


@jit
def _affine(x, W, b, out, act):
    """out = act(x @ W + b); act 0 identity, 1 relu, 2 sigmoid."""
    np.dot(x, W, out)
    n, m = out.shape
    for i in range(n):
        for j in range(m):
            v = out[i, j] + b[j]
            if act == 1:
                v = 0 if v <= 0 else v
            elif act == 2:
                v = 1 / (1 + np.exp(-v))
            out[i, j] = v


@jit
def _affine_backward(x, W, dout, dW, db):
    np.dot(x.T, dout, dW)
    n, m = dout.shape
    for j in range(m):
        db[j] = 0
    for i in range(n):
        for j in range(m):
            db[j] += dout[i, j]


@jit
def _affine_backward_dx(dout, W, dx):
    np.dot(dout, W.T, dx)


@jit
def _softmax(x, y):
    n, c = x.shape
    for i in range(n):
        m = x[i, 0]
        for j in range(1, c):
            if x[i, j] > m or m != m:
                m = x[i, j]
        s = 0.0
        for j in range(c):
            e = np.exp(x[i, j] - m)
            y[i, j] = e
            s += e
        for j in range(c):
            y[i, j] = y[i, j] / s


@jit
def _ce_labels(y, t):
    n = y.shape[0]
    s = 0.0
    for i in range(n):
        s += np.log(np.float64(y[i, t[i]]) + LOG_EPS)
    return -s / n


@jit
def _ce_onehot(y, t):
    yf, tf = y.reshape(-1), t.reshape(-1)
    s = 0.0
    for i in range(yf.size):
        if tf[i] != 0:
            s += tf[i] * np.log(np.float64(yf[i]) + LOG_EPS)
    return -s / y.shape[0]


@jit
def _sse(y, t):
    yf, tf = y.reshape(-1), t.reshape(-1)
    s = 0.0
    for i in range(yf.size):
        d = np.float64(yf[i]) - np.float64(tf[i])
        s += d * d
    return 0.5 * s


@jit
def _sl_backward_labels(y, t, dout, dx):
    n, c = y.shape
    scale = dout / n
    for i in range(n):
        for j in range(c):
            dx[i, j] = y[i, j] * scale
        dx[i, t[i]] = (y[i, t[i]] - 1) * scale


@jit
def _sl_backward_onehot(y, t, dout, dx):
    yf, tf, df = y.reshape(-1), t.reshape(-1), dx.reshape(-1)
    scale = dout / y.shape[0]
    for i in range(yf.size):
        df[i] = (yf[i] - tf[i]) * scale


# ------------------------------------------------------------------ the kernel table
def _unary(kernel, x, out):
    dt = chk.dtype_of(x, "x")
    x = chk.inp(x, dt, "x")
    kernel(x, chk.out(out, dt, "out", x.shape))
    return out


def step(x, out):
    return _unary(_step, x, out)


def sigmoid(x, out):
    return _unary(_sigmoid, x, out)


def relu(x, out):
    return _unary(_relu, x, out)


def _backward(kernel, dout, y, out):
    dt = chk.dtype_of(dout, "dout")
    dout, y = chk.inp(dout, dt, "dout"), chk.inp(y, dt, "y")
    chk.same_shape(dout, y, "dout", "y")
    kernel(dout, y, chk.out(out, dt, "out", dout.shape))
    return out


def sigmoid_backward(dout, y, out):
    return _backward(_sigmoid_backward, dout, y, out)


def relu_backward(dout, y, out):
    return _backward(_relu_backward, dout, y, out)


def _affine_args(x, W, b, out):
    dt = chk.dtype_of(x, "x")
    x, W = chk.inp(x, dt, "x"), chk.inp(W, dt, "W")
    if W.shape[0] != x.shape[1]:
        raise ValueError(
            f"x has shape {x.shape} but W has shape {W.shape}: "
            f"x's {x.shape[1]} columns must equal W's rows"
        )
    b = chk.inp(b, dt, "b", ndim=1)
    if b.shape != (W.shape[1],):
        raise ValueError(f"b has shape {b.shape}, expected ({W.shape[1]},)")
    return x, W, b, chk.out(out, dt, "out", (x.shape[0], W.shape[1]))


def affine(x, W, b, out):
    _affine(*_affine_args(x, W, b, out), 0)
    return out


def affine_relu(x, W, b, out):
    _affine(*_affine_args(x, W, b, out), 1)
    return out


def affine_sigmoid(x, W, b, out):
    _affine(*_affine_args(x, W, b, out), 2)
    return out


def affine_backward(x, W, dout, dW, db, dx=None):
    dt = chk.dtype_of(x, "x")
    x, W, dout = chk.inp(x, dt, "x"), chk.inp(W, dt, "W"), chk.inp(dout, dt, "dout")
    (n, d), m = x.shape, W.shape[1]
    if W.shape[0] != d or dout.shape != (n, m):
        raise ValueError(
            f"x {x.shape}, W {W.shape} and dout {dout.shape} do not fit "
            "x (N, D), W (D, M), dout (N, M)"
        )
    _affine_backward(x, W, dout, chk.out(dW, dt, "dW", (d, m)), chk.out(db, dt, "db", (m,)))
    if dx is not None:
        _affine_backward_dx(dout, W, chk.out(dx, dt, "dx", (n, d)))


def softmax(x, out):
    dt = chk.dtype_of(x, "x")
    x = chk.inp(x, dt, "x")
    if x.shape[1]:
        _softmax(x, chk.out(out, dt, "out", x.shape))
    return out


def cross_entropy_labels(y, t):
    dt = chk.dtype_of(y, "y")
    y = chk.inp(y, dt, "y")
    return float(_ce_labels(y, chk.labels(t, y.shape[0])))


def cross_entropy_onehot(y, t):
    dt = chk.dtype_of(y, "y")
    y, t = chk.inp(y, dt, "y"), chk.inp(t, dt, "t")
    chk.same_shape(y, t, "y", "t")
    return float(_ce_onehot(y, t))


def sum_squared_error(y, t):
    dt = chk.dtype_of(y, "y")
    y, t = chk.inp(y, dt, "y"), chk.inp(t, dt, "t")
    chk.same_shape(y, t, "y", "t")
    return float(_sse(y, t))


def softmax_loss_labels(x, t, y):
    return cross_entropy_labels(softmax(x, y), t)


def softmax_loss_onehot(x, t, y):
    return cross_entropy_onehot(softmax(x, y), t)


def softmax_loss_backward_labels(y, t, dout, dx):
    dt = chk.dtype_of(y, "y")
    y = chk.inp(y, dt, "y")
    _sl_backward_labels(y, chk.labels(t, y.shape[0]), float(dout), chk.out(dx, dt, "dx", y.shape))
    return dx


def softmax_loss_backward_onehot(y, t, dout, dx):
    dt = chk.dtype_of(y, "y")
    y, t = chk.inp(y, dt, "y"), chk.inp(t, dt, "t")
    chk.same_shape(y, t, "y", "t")
    _sl_backward_onehot(y, t, float(dout), chk.out(dx, dt, "dx", y.shape))
    return dx


def warmup(dtypes=(np.float32, np.float64)):
    """Compile (or load from the cache) every kernel for ``dtypes``; returns seconds."""
    import time

    start = time.perf_counter()
    t = np.array([0, 1], dtype=np.int64)
    for dtype in dtypes:
        x = np.ones((2, 3), dtype)
        W = np.ones((3, 2), dtype)
        b = np.ones(2, dtype)
        o2 = np.empty((2, 2), dtype)
        o3 = np.empty((2, 3), dtype)
        for f in (step, sigmoid, relu):
            f(x, o3)
        sigmoid_backward(x, x, o3)
        relu_backward(x, x, o3)
        for f in (affine, affine_relu, affine_sigmoid):
            f(x, W, b, o2)
        affine_backward(x, W, o2, np.empty_like(W), np.empty_like(b), o3)
        softmax_loss_labels(o2, t, o2)
        softmax_loss_onehot(o2, o2, o2)
        sum_squared_error(o2, o2)
        softmax_loss_backward_labels(o2, t, 1.0, o2)
        softmax_loss_backward_onehot(o2, o2, 1.0, o2)
    return time.perf_counter() - start
