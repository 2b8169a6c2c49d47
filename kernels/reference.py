"""The reference backend: the book's math in plain NumPy.

This is the oracle every compiled backend is tested against and the baseline every
benchmark divides by.  It is written for clarity, the way the book writes it; the only
liberties are writing into the caller's ``out`` arrays and silencing NumPy's overflow
warning in ``exp`` (the result, 0 or 1, is the correct limit).
"""

from __future__ import annotations

import numpy as np

from . import _checks
from .contract import LOG_EPS, OPT_BETA1, OPT_BETA2, OPT_DECAY, OPT_ITER, OPT_KIND, OPT_LR, Act, Opt, mlp_views

NAME = "numpy"


def step(x, out):
    out[...] = x > 0
    return out


def sigmoid(x, out):
    with np.errstate(over="ignore"):
        out[...] = 1 / (1 + np.exp(-x))
    return out


def sigmoid_backward(dout, y, out):
    out[...] = dout * (1.0 - y) * y
    return out


def relu(x, out):
    out[...] = np.maximum(x, 0)
    return out


def relu_backward(dout, y, out):
    out[...] = dout
    out[y <= 0] = 0
    return out


def affine(x, W, b, out):
    out[...] = np.dot(x, W) + b
    return out


def affine_relu(x, W, b, out):
    return relu(affine(x, W, b, out), out)


def affine_sigmoid(x, W, b, out):
    return sigmoid(affine(x, W, b, out), out)


def affine_backward(x, W, dout, dW, db, dx=None):
    dW[...] = np.dot(x.T, dout)
    db[...] = np.sum(dout, axis=0)
    if dx is not None:
        dx[...] = np.dot(dout, W.T)


def softmax(x, out):
    x = x - np.max(x, axis=1, keepdims=True)
    e = np.exp(x)
    out[...] = e / np.sum(e, axis=1, keepdims=True)
    return out


def cross_entropy_labels(y, t):
    return _cross_entropy_labels(y, _checks.labels(t, *y.shape))


def _cross_entropy_labels(y, t):
    batch_size = y.shape[0]
    return float(-np.sum(np.log(y[np.arange(batch_size), t] + LOG_EPS)) / batch_size)


def cross_entropy_onehot(y, t):
    batch_size = y.shape[0]
    return float(-np.sum(t * np.log(y + LOG_EPS)) / batch_size)


def sum_squared_error(y, t):
    return float(0.5 * np.sum((y - t) ** 2))


def softmax_loss_labels(x, t, y):
    t = _checks.labels(t, *x.shape)  # before y is written
    return _cross_entropy_labels(softmax(x, y), t)


def softmax_loss_onehot(x, t, y):
    return cross_entropy_onehot(softmax(x, y), t)


def softmax_loss_backward_labels(y, t, dout, dx):
    t = _checks.labels(t, *y.shape)
    batch_size = y.shape[0]
    dx[...] = y
    dx[np.arange(batch_size), t] -= 1
    dx *= dout / batch_size
    return dx


def softmax_loss_backward_onehot(y, t, dout, dx):
    batch_size = y.shape[0]
    dx[...] = (y - t) * (dout / batch_size)
    return dx
# ------------------------------------------------------------------ rows stored as CSR
def sparse_rows(X):
    """CSR of the rows of X: (indptr int64, indices int32 sorted per row, data X.dtype)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    if X.dtype not in (np.uint8, np.float32, np.float64):
        raise TypeError(f"X must be uint8, float32 or float64, got {X.dtype}")
    rows, cols = np.nonzero(X)
    indptr = np.zeros(X.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=X.shape[0]), out=indptr[1:])
    return indptr, cols.astype(np.int32), X[rows, cols]


def _dense_rows(indptr, indices, data, rows, D, dtype):
    """The rows ``rows`` of a CSR matrix as a dense float array (pixels / 255)."""
    out = np.zeros((len(rows), D), dtype)
    for i, r in enumerate(rows):
        lo, hi = indptr[r], indptr[r + 1]
        if lo < hi and (indices[lo:hi].min() < 0 or indices[lo:hi].max() >= D):
            raise ValueError(f"row {r} has a column index out of range for {D} inputs")
        values = data[lo:hi]
        out[i, indices[lo:hi]] = values / dtype.type(255) if data.dtype == np.uint8 else values
    return out


def sparse_affine(indptr, indices, data, row0, W, b, act, out):
    x = _dense_rows(indptr, indices, data, range(row0, row0 + out.shape[0]), W.shape[0], W.dtype)
    return (affine, affine_relu, affine_sigmoid)[act](x, W, b, out)





# ------------------------------------------------------------------ the MLP engine
# The net as the book's MultiLayerNet computes it, layer by layer, over the flat
# parameter vector theta (W1, b1, W2, b2, ... : contract.mlp_views).
def _batch(X, idx, dtype):
    return np.divide(X[idx], dtype.type(255), dtype=dtype) if X.dtype == np.uint8 else X[idx]


def _forward(x, layers, act):
    """The activations of every layer: [x, act(x @ W1 + b1), ..., scores]."""
    hidden = affine_relu if act == Act.RELU else affine_sigmoid
    outs = [x]
    for i, (W, b) in enumerate(layers):
        f = affine if i == len(layers) - 1 else hidden
        outs.append(f(outs[-1], W, b, np.empty((x.shape[0], W.shape[1]), W.dtype)))
    return outs


def _mlp_loss_gradient(x, t, sizes, act, theta, decay, grad):
    """Backpropagation as the book's MultiLayerNet.gradient, into ``grad``; returns the loss."""
    layers, grads = mlp_views(sizes, theta), mlp_views(sizes, grad)
    outs = _forward(x, layers, act)
    s = outs[-1]
    loss = softmax_loss_labels(s, t, s)
    dout = softmax_loss_backward_labels(s, t, 1.0, s)
    for i in reversed(range(len(layers))):
        (W, _), (dW, db) = layers[i], grads[i]
        dx = np.empty_like(outs[i]) if i else None
        affine_backward(outs[i], W, dout, dW, db, dx)
        if decay:
            dW += W.dtype.type(decay) * W
        if i:
            dout = (relu_backward if act == Act.RELU else sigmoid_backward)(dx, outs[i], dx)
    if decay:
        loss += sum(0.5 * decay * float(np.sum(np.square(W, dtype=np.float64))) for W, _ in layers)
    return loss


def _optimizer_update(theta, grad, opt, state):
    """The book's optimisers (fastnet.optim) on the flat vectors."""
    kind, dt = int(opt[OPT_KIND]), theta.dtype.type
    lr = dt(opt[OPT_LR])
    if kind == Opt.SGD:
        theta -= lr * grad
    elif kind == Opt.MOMENTUM:
        v = state[0]
        v *= dt(opt[OPT_BETA1])
        v -= lr * grad
        theta += v
    elif kind == Opt.ADAGRAD:
        h = state[0]
        h += grad * grad
        theta -= lr * grad / (np.sqrt(h) + dt(LOG_EPS))
    else:
        opt[OPT_ITER] += 1
        b1, b2, it = opt[OPT_BETA1], opt[OPT_BETA2], opt[OPT_ITER]
        lr_t = opt[OPT_LR] * np.sqrt(1.0 - b2**it) / (1.0 - b1**it)
        m, v = state
        m += dt(1 - b1) * (grad - m)
        v += dt(1 - b2) * (grad**2 - v)
        theta -= dt(lr_t) * m / (np.sqrt(v) + dt(LOG_EPS))


def _mlp_steps(rows_of, T, idx, sizes, act, theta, opt, state, losses):
    grad = np.empty_like(theta)
    for k in range(idx.shape[0]):
        losses[k] = _mlp_loss_gradient(rows_of(idx[k]), T[idx[k]], sizes, act, theta, opt[OPT_DECAY], grad)
        _optimizer_update(theta, grad, opt, state)
        if not np.isfinite(losses[k]):
            return k + 1
    return idx.shape[0]


def train_steps_mlp(X, T, idx, sizes, act, theta, opt, state, losses):
    X, T, idx, sizes = _checks.mlp_steps(X, T, idx, sizes, act, theta, opt, state, losses)
    return _mlp_steps(lambda rows: _batch(X, rows, theta.dtype), T, idx, sizes, act, theta, opt, state, losses)


def train_steps_mlp_sparse(indptr, indices, data, T, idx, sizes, act, theta, opt, state, losses):
    csr = (indptr, indices, data)
    _, T, idx, sizes = _checks.mlp_steps(None, T, idx, sizes, act, theta, opt, state, losses, csr)
    return _mlp_steps(lambda rows: _dense_rows(*csr, rows, sizes[0], theta.dtype), T, idx, sizes, act, theta,
                      opt, state, losses)


def mlp_gradient(X, T, idx, sizes, act, theta, decay, grad):
    X, T, idx, sizes = _checks.mlp_gradient(X, T, idx, sizes, act, theta, decay, grad)
    return _mlp_loss_gradient(_batch(X, idx, theta.dtype), T[idx], sizes, act, theta, decay, grad)


def _labels_of(x, sizes, act, theta, out):
    out[...] = np.argmax(_forward(x, mlp_views(sizes, theta), act)[-1], axis=1)
    return out


def predict_mlp(X, sizes, act, theta, out):
    X, sizes = _checks.mlp_predict(X, sizes, act, theta, out)
    for start in range(0, X.shape[0], 2000):  # a chunk at a time: the floats of a whole data set are large
        rows = slice(start, start + 2000)
        _labels_of(_batch(X, rows, theta.dtype), sizes, act, theta, out[rows])
    return out


def sparse_predict_mlp(indptr, indices, data, row0, sizes, act, theta, out):
    _, sizes = _checks.mlp_predict(None, sizes, act, theta, out, (indptr, indices, data), row0)
    x = _dense_rows(indptr, indices, data, range(row0, row0 + out.shape[0]), sizes[0], theta.dtype)
    return _labels_of(x, sizes, act, theta, out)


def _mlp_loss(x, t, sizes, act, theta):
    s = _forward(x, mlp_views(sizes, theta), act)[-1]
    return _cross_entropy_labels(softmax(s, s), t)


def numerical_gradient_mlp(x, t, sizes, act, theta, h, grad):
    """The book's loop: perturb each parameter in place, recompute the whole loss twice."""
    x, t, sizes = _checks.mlp_numgrad(x, t, sizes, act, theta, h, grad)
    for i in range(theta.size):
        tmp = theta[i]
        try:
            theta[i] = tmp + h
            fxh1 = _mlp_loss(x, t, sizes, act, theta)
            theta[i] = tmp - h
            fxh2 = _mlp_loss(x, t, sizes, act, theta)
        finally:
            theta[i] = tmp
        grad[i] = (fxh1 - fxh2) / (2 * h)


def get_num_threads():
    """The reference kernels are NumPy code run by the calling thread: 1.  (NumPy's own
    BLAS threads are NumPy's setting: ``OPENBLAS_NUM_THREADS`` or threadpoolctl.)"""
    return 1


def set_num_threads(n):
    """Accepted for the same API as the compiled backends; the reference kernels always
    run on the calling thread."""
    _checks.threads(n)


def warmup(dtypes=None):
    """Nothing to compile."""
    return 0.0
