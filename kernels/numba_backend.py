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

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _checks as chk
from ._blas import one_thread, spin_briefly
from ._scratch import buffer
from .contract import (
    LOG_EPS,
    OPT_BETA1,
    OPT_BETA2,
    OPT_DECAY,
    OPT_ITER,
    OPT_KIND,
    OPT_LR,
    Act,
    Opt,
    mlp_size,
    mlp_views,
)

# Numba's products call SciPy's BLAS, which Numba loads when it first compiles or loads
# one; loaded here instead, so that its idle threads spin only briefly (_blas.py)
with spin_briefly():
    import scipy.linalg.cython_blas  # noqa: E402, F401

# the codes as plain ints: Numba compiles module globals in as constants
RELU, SIGMOID = int(Act.RELU), int(Act.SIGMOID)
SGD, MOMENTUM, ADAGRAD = int(Opt.SGD), int(Opt.MOMENTUM), int(Opt.ADAGRAD)

NAME = "numba"

jit = njit(cache=True, nogil=True)
inline = njit(inline="always", cache=True)


# ------------------------------------------------------------------ vectorisable exp
# Numba's np.exp calls libm once per element (about 5 ns here) and never vectorises
# without an SVML-patched LLVM, which pip's llvmlite is not.  _exp64/_exp32 are the
# algorithm of _vmath.h (the Cython side), line for line: Cody-Waite reduction, a
# Taylor polynomial, 2^n from exponent bits in two halves.  NaN -> NaN, +inf -> inf,
# -inf -> 0; within 2 ulp.  The bit casts are LLVM bitcasts (no memory round trip).
def _bitcast(src, dst):
    @intrinsic
    def cast(typingctx, value):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(dst))

        return dst(src), codegen

    return cast


_f64_bits = _bitcast(types.float64, types.int64)
_bits_f64 = _bitcast(types.int64, types.float64)
_f32_bits = _bitcast(types.float32, types.int32)
_bits_f32 = _bitcast(types.int32, types.float32)

_ROUND64, _TWO52 = 6755399441055744.0, 4503599627370496.0
_ROUND32, _TWO23 = np.float32(12582912.0), np.float32(8388608.0)


@inline
def _exp64(x):
    xc = -1100.0 if x < -1100.0 else (1100.0 if x > 1100.0 else x)
    n = (xc * 1.4426950408889634 + _ROUND64) - _ROUND64
    r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    n1 = (n * 0.5 + _ROUND64) - _ROUND64
    n2 = n - n1
    e1 = _f64_bits(n1 + 1023.0 + _TWO52) - _f64_bits(_TWO52)
    e2 = _f64_bits(n2 + 1023.0 + _TWO52) - _f64_bits(_TWO52)
    return p * _bits_f64(e1 << 52) * _bits_f64(e2 << 52)


@inline
def _exp32(x):
    lo, hi = np.float32(-170.0), np.float32(170.0)
    xc = lo if x < lo else (hi if x > hi else x)
    n = (xc * np.float32(1.44269504088896341) + _ROUND32) - _ROUND32
    r = (xc - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    n1 = (n * np.float32(0.5) + _ROUND32) - _ROUND32
    n2 = n - n1
    e1 = _f32_bits(n1 + np.float32(127.0) + _TWO23) - _f32_bits(_TWO23)
    e2 = _f32_bits(n2 + np.float32(127.0) + _TWO23) - _f32_bits(_TWO23)
    return p * _bits_f32(e1 << np.int32(23)) * _bits_f32(e2 << np.int32(23))


def _exp_inplace(y):
    """y = exp(y) for a 1-D float32 or float64 array (the dtype picks the variant)."""


def _sigmoid_inplace(y):
    """y = 1 / (1 + exp(-y)) for a 1-D float32 or float64 array."""


@overload(_exp_inplace)
def _exp_inplace_typed(y):
    if y.dtype == types.float32:

        def impl32(y):
            for i in range(y.size):
                y[i] = _exp32(y[i])

        return impl32

    def impl64(y):
        for i in range(y.size):
            y[i] = _exp64(y[i])

    return impl64


@overload(_sigmoid_inplace)
def _sigmoid_inplace_typed(y):
    if y.dtype == types.float32:

        def impl32(y):
            one = np.float32(1.0)
            for i in range(y.size):
                y[i] = one / (one + _exp32(-y[i]))

        return impl32

    def impl64(y):
        for i in range(y.size):
            y[i] = 1.0 / (1.0 + _exp64(-y[i]))

    return impl64


# ------------------------------------------------------------------ jitted kernels
@jit
def _step(x, out):
    xf, of = x.reshape(-1), out.reshape(-1)
    for i in range(xf.size):
        of[i] = 1 if xf[i] > 0 else 0


@jit
def _sigmoid(x, out):
    of = out.reshape(-1)
    of[:] = x.reshape(-1)
    _sigmoid_inplace(of)


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
    """out = act(x @ W + b) (contract.Act)."""
    np.dot(x, W, out)
    n, m = out.shape
    for i in range(n):
        for j in range(m):
            v = out[i, j] + b[j]
            if act == RELU:
                v = 0 if v <= 0 else v
            out[i, j] = v
    if act == SIGMOID:
        _sigmoid_inplace(out.reshape(-1))


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


@inline
def _softmax_rows(x, y):
    """Row-wise: y = x - max(row); y = exp(y) over the whole block; y /= sum(row)."""
    n, c = x.shape
    for i in range(n):
        m = x[i, 0]
        for j in range(1, c):
            if x[i, j] > m or m != m:
                m = x[i, j]
        for j in range(c):
            y[i, j] = x[i, j] - m
    _exp_inplace(y.reshape(-1))
    for i in range(n):
        s = 0.0
        for j in range(c):
            s += y[i, j]
        for j in range(c):
            y[i, j] = y[i, j] / s


@jit
def _softmax(x, y):
    _softmax_rows(x, y)


@jit
def _softmax_ce_labels(x, t, y):
    _softmax_rows(x, y)
    return _ce_labels(y, t)


@inline
def _ce_labels(y, t):
    n = y.shape[0]
    s = 0.0
    for i in range(n):
        s += np.log(np.float64(y[i, t[i]]) + LOG_EPS)
    return -s / n


@jit
def _labels_in_range(t, C):
    """True when every label is in [0, C): the fast paths' check, compiled (the
    wrappers' NumPy min/max would cost more than the kernel on a batch of 100)."""
    for i in range(t.shape[0]):
        if t[i] < 0 or t[i] >= C:
            return False
    return True


@jit
def _ce_labels_call(y, t):
    return _ce_labels(y, t)


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


@jit
def _step_top(h, T, idx, W2, b2, act, s, dh, db1, dW2, db2):
    """Everything of a two-layer step above the first layer's product: the second
    Affine, softmax-with-loss, dW2, db2, dh (with the old W2, through the activation's
    derivative) and db1.  Returns the batch loss."""
    B = s.shape[0]
    _affine(h, W2, b2, s, 0)
    loss = _softmax_loss_delta(s, T, idx)
    np.dot(s, W2.T, dh)
    _affine_backward(h, W2, s, dW2, db2)
    if act == RELU:
        _relu_backward(dh, h, dh)
    else:
        _sigmoid_backward(dh, h, dh)
    H = dh.shape[1]
    for j in range(H):
        db1[j] = 0
    for i in range(B):
        for j in range(H):
            db1[j] += dh[i, j]
    return loss


@jit
def _sgd(params, grads, lr):
    for p, g in zip(params, grads):
        pf, gf = p.reshape(-1), g.reshape(-1)
        for k in range(pf.size):
            pf[k] -= lr * gf[k]




# ------------------------------------------------------------------ sparse first layer
# The algorithm of _sparse.h (the Cython side): the forward over a batch first reads the
# batch's rows into cache, then keeps four non-zeros per pass over out[i, :]; the update
# scatters X^T G into W by column ranges, one range per thread (each column in row order,
# so any thread count gives the same result).  Threads only where there is work for them
# (PARALLEL_NNZ).  The padded layout is used only by the many-steps kernel for float32
# rows of 49 to 64 hidden units (PAD, below).
PARALLEL_NNZ = 4096


def _value(data, lut, p):
    """The p-th stored value: lut[data[p]] for uint8 pixels, else data[p]."""


@overload(_value, inline="always")
def _value_typed(data, lut, p):
    if isinstance(data.dtype, types.Integer):
        return lambda data, lut, p: lut[data[p]]
    return lambda data, lut, p: data[p]


@intrinsic
def _prefetch(typingctx, arr, i):
    """Hint the CPU to bring &arr[i] into cache (llvm.prefetch: read, keep, data)."""

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False,
                                       boundscheck=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


#: x86's MXCSR bits FTZ and DAZ: subnormal results and inputs are taken as 0
_FLUSH_BITS = 0x8040
_X86 = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _mxcsr(typingctx, value):
    """Set the calling thread's MXCSR (SSE control) register to ``value`` (its 32 bits;
    -1 leaves it as it is) and return what it held before; 0, and nothing set, where
    the CPU is not x86."""

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        if not _X86:
            return i32(0)
        i8p = ir.IntType(8).as_pointer()
        cell = cgutils.alloca_once(builder, i32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p])
        read = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr")
        write = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr")
        builder.call(read, [builder.bitcast(cell, i8p)])
        before = builder.load(cell)
        with builder.if_then(builder.icmp_signed("!=", args[0], i32(-1))):
            builder.store(args[0], cell)
            builder.call(write, [builder.bitcast(cell, i8p)])
        return before

    return types.int32(types.int32), codegen


@inline
def _prefetch_row(indptr, indices, data, r):
    """Bring the CSR entries of row r into cache while the previous row is worked on
    (as fn_prefetch_row in _sparse.h: rows of a random batch lie far apart)."""
    p, e = indptr[r], indptr[r + 1]
    for q in range(p, e, 16):
        _prefetch(indices, q)
    for q in range(p, e, 64 // data.itemsize):
        _prefetch(data, q)


@inline
def _touch_rows(indptr, indices, data, rows, lo, hi):
    """Read the CSR entries of rows[lo:hi] (one load per 64-byte line, the rows after
    next prefetched) before the work on them starts: as fn_touch_rows in _sparse.h.
    Returns a number that is never INT64_MAX, which the caller tests so that the loads
    are kept."""
    total = 0
    for i in range(lo, hi):
        if i + 2 < hi:
            _prefetch_row(indptr, indices, data, rows[i + 2])
        p, e = indptr[rows[i]], indptr[rows[i] + 1]
        for q in range(p, e, 16):
            total += indices[q]
        for q in range(p, e, 64 // data.itemsize):
            total += np.int64(data[q] != 0)
    return total


@inline
def _lower_bound(indices, lo, hi, j):
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if indices[mid] < j:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def _split_rows(indptr, rows, row0, n, nt):
    """Runs of rows with about equal non-zeros, one per thread: run t is cut[t]:cut[t+1]."""
    total = 0
    for i in range(n):
        r = rows[i] if rows.size else row0 + i
        total += indptr[r + 1] - indptr[r]
    nt = max(min(nt, n), 1)
    if total < PARALLEL_NNZ:
        nt = 1
    cut = np.empty(nt + 1, np.int64)
    cut[0] = 0
    t, acc = 1, 0
    for i in range(n):
        while t < nt and acc * nt >= total * t:
            cut[t] = i
            t += 1
        r = rows[i] if rows.size else row0 + i
        acc += indptr[r + 1] - indptr[r]
    while t <= nt:
        cut[t] = n
        t += 1
    return cut


@inline
def _forward_rows(indptr, indices, data, lut, rows, row0, lo, hi, W, b, out, act, width):
    """out[i, :width] = act(X[r] @ W + b)[:width] for i in lo:hi, r = rows[i] (or row0 + i
    when rows is empty); returns the number of column indices outside [0, D) (left out).
    Inlined into its callers: a constant ``width`` (PAD) is a constant loop bound there."""
    D = W.shape[0]
    nb = 0
    if rows.size and _touch_rows(indptr, indices, data, rows, lo, hi) == 9223372036854775807:
        nb += 1  # never: int32 columns of at most 2**31 entries cannot sum to that
    for i in range(lo, hi):
        r = rows[i] if rows.size else row0 + i
        if not rows.size and i + 1 < hi:  # consecutive rows; a batch's were read just above
            _prefetch_row(indptr, indices, data, r + 1)
        p, e = indptr[r], indptr[r + 1]
        o = out[i]
        for k in range(width):
            o[k] = b[k]
        while p + 4 <= e:
            j0, j1, j2, j3 = indices[p], indices[p + 1], indices[p + 2], indices[p + 3]
            if min(j0, j1, j2, j3) < 0 or max(j0, j1, j2, j3) >= D:
                nb += 1
            else:
                v0, v1 = _value(data, lut, p), _value(data, lut, p + 1)
                v2, v3 = _value(data, lut, p + 2), _value(data, lut, p + 3)
                w0, w1, w2, w3 = W[j0], W[j1], W[j2], W[j3]
                for k in range(width):
                    o[k] += (v0 * w0[k] + v1 * w1[k]) + (v2 * w2[k] + v3 * w3[k])
            p += 4
        while p < e:
            j = indices[p]
            if j < 0 or j >= D:
                nb += 1
            else:
                v = _value(data, lut, p)
                w = W[j]
                for k in range(width):
                    o[k] += v * w[k]
            p += 1
        if act == RELU:
            for k in range(width):
                o[k] = 0 if o[k] <= 0 else o[k]
        elif act == SIGMOID:
            _sigmoid_inplace(o)
    return nb


@jit
def _sp_forward_rows(indptr, indices, data, lut, rows, row0, lo, hi, W, b, out, act):
    """_forward_rows over the whole width of W."""
    return _forward_rows(indptr, indices, data, lut, rows, row0, lo, hi, W, b, out, act, W.shape[1])


@inline
def _scatter_cols(indptr, indices, data, lut, rows, G, W, jlo, jhi, zero, width):
    """W[jlo:jhi, :width] += (X[rows].T @ G)[jlo:jhi, :width] (= when zero) over the
    non-zeros only (inlined, as _forward_rows)."""
    D = W.shape[0]
    nb = 0
    if zero:
        for j in range(jlo, jhi):
            for k in range(width):
                W[j, k] = 0
    for i in range(rows.size):
        r = rows[i]  # read into cache by the step's forward (_touch_rows)
        p, e = indptr[r], indptr[r + 1]
        if jlo > 0:
            p = _lower_bound(indices, p, e, jlo)
        if jhi < D:
            e = _lower_bound(indices, p, e, jhi)
        g = G[i]
        for q in range(p, e):
            j = indices[q]
            if j < 0 or j >= D:
                nb += 1
                continue
            v = _value(data, lut, q)
            w = W[j]
            for k in range(width):
                w[k] += v * g[k]
    return nb


@jit
def _sp_scatter_cols(indptr, indices, data, lut, rows, G, W, jlo, jhi, zero):
    """_scatter_cols over the whole width of W."""
    return _scatter_cols(indptr, indices, data, lut, rows, G, W, jlo, jhi, zero, W.shape[1])


@njit(cache=True, nogil=True, parallel=True)
def _sp_forward_par(indptr, indices, data, lut, rows, row0, W, b, out, act, cut):
    """out = act(X[rows] @ W + b), run t of the rows (cut[t]:cut[t+1]) on thread t."""
    nt = cut.size - 1
    bad = np.zeros(nt, np.int64)
    for t in prange(nt):
        bad[t] = _sp_forward_rows(indptr, indices, data, lut, rows, row0, cut[t], cut[t + 1], W, b, out, act)
    return bad.sum()


@njit(cache=True, nogil=True, parallel=True)
def _sp_scatter_par(indptr, indices, data, lut, rows, G, W, nt, zero):
    """W += X[rows].T @ G (W = X[rows].T @ G when zero), thread t owning the rows
    D t / nt : D (t + 1) / nt of W."""
    D = W.shape[0]
    bad = np.zeros(nt, np.int64)
    for t in prange(nt):
        bad[t] = _sp_scatter_cols(indptr, indices, data, lut, rows, G, W, D * t // nt, D * (t + 1) // nt, zero)
    return bad.sum()


@jit
def _check_rows(indptr, nnz, rows, row0, n):
    n_rows = indptr.size - 1
    for i in range(n):
        r = rows[i] if rows.size else row0 + i
        if r < 0 or r >= n_rows:
            raise IndexError("a batch index is out of range for the CSR rows")
        if indptr[r] < 0 or indptr[r] > indptr[r + 1] or indptr[r + 1] > nnz:
            raise ValueError("indptr is not a valid CSR row pointer")


# Plain SGD on a two-layer net of float32 with 49 to 64 hidden units (the book's 50)
# reads W1 in a padded copy: rows of PAD floats, 64-byte aligned, PAD a compile-time
# constant, so that the loops over a row are four whole vectors (as the Cython side's
# layout), faster for the book's net than the general engine (benchmarks/README.md).
PAD = 64


@njit(cache=True, nogil=True, parallel=True)
def _sp_step_pad_par(indptr, indices, data, lut, rows, Wp, bp, hp, act, cut, Gp, scatter):
    """The forward (scatter False: run t of the rows on thread t) or the update (scatter
    True: thread t owning the rows D t / nt : D (t + 1) / nt of Wp) of a padded step."""
    nt = cut.size - 1
    D = Wp.shape[0]
    bad = np.zeros(nt, np.int64)
    for t in prange(nt):
        if scatter:
            bad[t] = _scatter_cols(indptr, indices, data, lut, rows, Gp, Wp, D * t // nt, D * (t + 1) // nt,
                                   False, PAD)
        else:
            bad[t] = _forward_rows(indptr, indices, data, lut, rows, 0, cut[t], cut[t + 1], Wp, bp, hp, act, PAD)
    return bad.sum()


@jit
def _train_steps_2layer_sparse_pad(indptr, indices, data, lut, T, idx, W1, b1, W2, b2, lr, act, nt,
                                   h, s, dh, db1, dW2, db2, losses, Wp, bp, hp, Gp):
    """SGD steps of the two-layer net over CSR rows (train_steps_mlp_sparse's case) with
    W1, b1, h and the update rows in the padded buffers Wp, bp, hp, Gp (zero past H); W1
    and b1 are copied back at the end, also when a step stops the run.  Returns (steps
    run, column indices outside W1 met)."""
    D, H = W1.shape
    B = s.shape[0]
    for j in range(D):
        for k in range(H):
            Wp[j, k] = W1[j, k]
    for k in range(H):
        bp[k] = b1[k]
    mlr = -lr
    done, bad = idx.shape[0], 0
    for step in range(idx.shape[0]):
        rows = idx[step]
        cut = _split_rows(indptr, rows, 0, B, nt)
        bad = _sp_step_pad_par(indptr, indices, data, lut, rows, Wp, bp, hp, act, cut, Gp, False)
        for i in range(B):
            for k in range(H):
                h[i, k] = hp[i, k]
        losses[step] = _step_top(h, T, rows, W2, b2, act, s, dh, db1, dW2, db2)
        for i in range(B):
            for k in range(H):
                Gp[i, k] = dh[i, k] * mlr
        bad += _sp_step_pad_par(indptr, indices, data, lut, rows, Wp, bp, hp, act, cut, Gp, True)
        _sgd((W2,), (dW2,), lr)
        _sgd((b2,), (db2,), lr)
        for k in range(H):
            bp[k] -= lr * db1[k]
        if bad or not np.isfinite(losses[step]):
            done = step + 1
            break
    for j in range(D):
        for k in range(H):
            W1[j, k] = Wp[j, k]
    for k in range(H):
        b1[k] = bp[k]
    return done, bad


def _aligned_zeros(shape, dtype):
    """Zeros of ``shape`` whose first element is 64-byte aligned."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = np.zeros(n + 64 // dtype.itemsize, dtype)
    start = (-buf.ctypes.data % 64) // dtype.itemsize
    return buf[start : start + n].reshape(shape)


@jit
def _sparse_affine(indptr, indices, data, lut, row0, W, b, act, out, nt):
    n = out.shape[0]
    empty = np.empty(0, np.int64)
    _check_rows(indptr, indices.size, empty, row0, n)
    cut = _split_rows(indptr, empty, row0, n, nt)
    return _sp_forward_par(indptr, indices, data, lut, empty, row0, W, b, out, act, cut)


@jit
def _count_row(x):
    c = 0
    for j in range(x.size):
        c += x[j] != 0
    return c


@jit
def _fill_row(x, indices, data):
    q = 0
    for j in range(x.size):
        if x[j] != 0:
            indices[q] = j
            data[q] = x[j]
            q += 1


@njit(cache=True, nogil=True, parallel=True)
def _sparse_rows(X):
    N = X.shape[0]
    counts = np.zeros(N + 1, np.int64)
    for r in prange(N):
        counts[r + 1] = _count_row(X[r])
    indptr = np.cumsum(counts)
    indices = np.empty(indptr[N], np.int32)
    data = np.empty(indptr[N], X.dtype)
    for r in prange(N):
        _fill_row(X[r], indices[indptr[r]:indptr[r + 1]], data[indptr[r]:indptr[r + 1]])
    return indptr, indices, data


# ------------------------------------------------------------------ the MLP engine
# A net of any depth as one flat parameter vector theta (W1, b1, W2, b2, ...: the
# layout of contract.mlp_views).  Each call allocates its scratch once: the outputs of
# every layer for a batch (acts), their gradients (deltas) and the gradient of theta.
# The arguments are checked by _checks.mlp_* before these functions run.
@jit
def _mlp_offsets(sizes):
    """off[k]: where W_{k+1} starts in theta (b_{k+1} follows it); off[-1] = len(theta)."""
    L = sizes.size - 1
    off = np.zeros(L + 1, np.int64)
    for k in range(L):
        off[k + 1] = off[k] + sizes[k] * sizes[k + 1] + sizes[k + 1]
    return off


@jit
def _act_offsets(sizes, B):
    """aoff[k]: where layer k's outputs (B, sizes[k + 1]) start in the acts buffer."""
    L = sizes.size - 1
    aoff = np.zeros(L + 1, np.int64)
    for k in range(L):
        aoff[k + 1] = aoff[k] + B * sizes[k + 1]
    return aoff


@jit
def _weights(theta, sizes, off, k):
    n_in, n_out = sizes[k], sizes[k + 1]
    at = off[k] + n_in * n_out
    return theta[off[k]:at].reshape((n_in, n_out)), theta[at:at + n_out]


@jit
def _rows_view(buf, aoff, k, B):
    return buf[aoff[k]:aoff[k + 1]].reshape((B, (aoff[k + 1] - aoff[k]) // B))


@jit
def _softmax_loss_delta(S, T, rows):
    """S (B, C) scores -> (softmax(S) - onehot) / B in place; returns the batch's mean loss."""
    B, C = S.shape
    _softmax_rows(S, S)
    loss = 0.0
    for i in range(B):
        loss -= np.log(np.float64(S[i, T[rows[i]]]) + LOG_EPS)
    scale = S.dtype.type(1.0 / B)
    for i in range(B):
        for j in range(C):
            S[i, j] = S[i, j] * scale
        S[i, T[rows[i]]] -= scale
    return loss / B


@jit
def _column_sums(G, out):
    for j in range(out.size):
        out[j] = 0
    for i in range(G.shape[0]):
        for j in range(out.size):
            out[j] += G[i, j]


@jit
def _mlp_backprop(theta, grad, sizes, off, act, x, acts, deltas, aoff, T, rows, lo, decay):
    """Forward from layer lo (its input x when lo is 0, else the outputs of layer lo - 1
    already in acts), softmax-with-loss, then backward: the gradient of every layer's
    W (from layer lo on) and b into grad, and for lo = 1 the gradient at layer 0's
    pre-activation left in deltas (its W is the caller's: the sparse product).
    Returns the loss, with 0.5 decay sum(W**2) when decay is not 0."""
    L = sizes.size - 1
    B = rows.size
    for k in range(lo, L):
        W, b = _weights(theta, sizes, off, k)
        inp = x if k == 0 else _rows_view(acts, aoff, k - 1, B)
        _affine(inp, W, b, _rows_view(acts, aoff, k, B), act if k < L - 1 else 0)
    top = _rows_view(acts, aoff, L - 1, B)
    loss = _softmax_loss_delta(top, T, rows)
    dz = top
    for k in range(L - 1, -1, -1):
        W, b = _weights(theta, sizes, off, k)
        dW, db = _weights(grad, sizes, off, k)
        _column_sums(dz, db)
        if k >= lo:
            np.dot(x.T if k == 0 else _rows_view(acts, aoff, k - 1, B).T, dz, dW)
            if decay != 0:
                d = W.dtype.type(decay)
                dWf, Wf = dW.reshape(-1), W.reshape(-1)
                for q in range(Wf.size):
                    dWf[q] += d * Wf[q]
        if k > 0:
            below = _rows_view(deltas, aoff, k - 1, B)
            np.dot(dz, W.T, below)
            h = _rows_view(acts, aoff, k - 1, B)
            if act == RELU:
                _relu_backward(below, h, below)
            else:
                _sigmoid_backward(below, h, below)
            dz = below
    if decay != 0:
        for k in range(L):
            Wf = _weights(theta, sizes, off, k)[0].reshape(-1)
            s = 0.0
            for q in range(Wf.size):
                s += np.float64(Wf[q]) * Wf[q]
            loss += 0.5 * decay * s
    return loss


@jit
def _optimizer_update(theta, grad, opt, state, start):
    """The optimiser of the record opt on theta[start:] from grad (fastnet.optim's
    formulas, in theta's dtype), with subnormal numbers flushed to zero as in
    _optim.h (Momentum's and Adam's state decays into them where a gradient is 0)."""
    before = _mxcsr(-1)
    _mxcsr(before | _FLUSH_BITS)
    _optimizer_loops(theta, grad, opt, state, start)
    _mxcsr(before)


@jit
def _optimizer_loops(theta, grad, opt, state, start):
    kind = int(opt[OPT_KIND])
    one = theta.dtype.type(1)
    lr = theta.dtype.type(opt[OPT_LR])
    eps = theta.dtype.type(LOG_EPS)
    if kind == SGD:
        for q in range(start, theta.size):
            theta[q] -= lr * grad[q]
    elif kind == MOMENTUM:
        mom = theta.dtype.type(opt[OPT_BETA1])
        v = state[0]
        for q in range(start, theta.size):
            v[q] = v[q] * mom - lr * grad[q]
            theta[q] += v[q]
    elif kind == ADAGRAD:
        h = state[0]
        for q in range(start, theta.size):
            g = grad[q]
            h[q] += g * g
            theta[q] -= lr * g / (np.sqrt(h[q]) + eps)
    else:
        opt[OPT_ITER] += 1
        b1, b2, it = opt[OPT_BETA1], opt[OPT_BETA2], opt[OPT_ITER]
        lr_t = theta.dtype.type(opt[OPT_LR] * np.sqrt(1.0 - b2**it) / (1.0 - b1**it))
        c1, c2 = one - theta.dtype.type(b1), one - theta.dtype.type(b2)
        m, v = state[0], state[1]
        for q in range(start, theta.size):
            g = grad[q]
            m[q] += c1 * (g - m[q])
            v[q] += c2 * (g * g - v[q])
            theta[q] -= lr_t * m[q] / (np.sqrt(v[q]) + eps)


@jit
def _gather(X, rows, div, xb):
    """xb[i] = X[rows[i]] in xb's dtype, / 255 for uint8 pixels (div 255; else 1, exact)."""
    for i in range(rows.size):
        r = rows[i]
        for j in range(xb.shape[1]):
            xb[i, j] = X[r, j]
            xb[i, j] = xb[i, j] / div


@jit
def _mlp_steps(X, div, T, idx, sizes, act, theta, opt, state, losses):
    S, B = idx.shape
    off, aoff = _mlp_offsets(sizes), _act_offsets(sizes, B)
    xb = np.empty((B, sizes[0]), theta.dtype)
    acts, deltas = np.empty(aoff[-1], theta.dtype), np.empty(aoff[-1], theta.dtype)
    grad = np.empty_like(theta)
    for k in range(S):
        _gather(X, idx[k], div, xb)
        losses[k] = _mlp_backprop(theta, grad, sizes, off, act, xb, acts, deltas, aoff, T, idx[k], 0, opt[OPT_DECAY])
        _optimizer_update(theta, grad, opt, state, 0)
        if not np.isfinite(losses[k]):
            return k + 1
    return S


@jit
def _mlp_gradient(xb, T, rows, sizes, act, theta, decay, grad, acts, deltas):
    """The gradient of one batch, the rows xb (B, D) of T's rows ``rows``; acts and
    deltas are the caller's scratch."""
    B = rows.size
    off, aoff = _mlp_offsets(sizes), _act_offsets(sizes, B)
    return _mlp_backprop(theta, grad, sizes, off, act, xb, acts, deltas, aoff, T, rows, 0, decay)


@jit
def _mlp_steps_sparse(indptr, indices, data, lut, T, idx, sizes, act, theta, opt, state, losses, nt):
    """_mlp_steps over CSR rows: layer 0 forward and its W's gradient over the non-zeros.
    Plain SGD without weight decay adds -lr X^T G to W1 directly (no dense dW1).
    Returns (steps run, column indices outside W1 met)."""
    S, B = idx.shape
    off, aoff = _mlp_offsets(sizes), _act_offsets(sizes, B)
    acts, deltas = np.empty(aoff[-1], theta.dtype), np.empty(aoff[-1], theta.dtype)
    grad = np.empty_like(theta)
    none = np.empty((0, sizes[0]), theta.dtype)
    direct = opt[OPT_KIND] == SGD and opt[OPT_DECAY] == 0
    mlr = theta.dtype.type(-opt[OPT_LR])
    W0, b0 = _weights(theta, sizes, off, 0)
    dW0 = _weights(grad, sizes, off, 0)[0]
    L = sizes.size - 1
    for k in range(S):
        rows = idx[k]
        cut = _split_rows(indptr, rows, 0, B, nt)
        h = _rows_view(acts, aoff, 0, B)
        bad = _sp_forward_par(indptr, indices, data, lut, rows, 0, W0, b0, h, act if L > 1 else 0, cut)
        losses[k] = _mlp_backprop(theta, grad, sizes, off, act, none, acts, deltas, aoff, T, rows, 1, opt[OPT_DECAY])
        G = _rows_view(deltas, aoff, 0, B) if L > 1 else h
        if direct:
            for i in range(B):
                for j in range(G.shape[1]):
                    G[i, j] *= mlr
            bad += _sp_scatter_par(indptr, indices, data, lut, rows, G, W0, cut.size - 1, False)
            _optimizer_update(theta, grad, opt, state, W0.size)
        else:
            bad += _sp_scatter_par(indptr, indices, data, lut, rows, G, dW0, cut.size - 1, True)
            if opt[OPT_DECAY] != 0:
                d = theta.dtype.type(opt[OPT_DECAY])
                for q in range(W0.size):
                    grad[q] += d * theta[q]
            _optimizer_update(theta, grad, opt, state, 0)
        if bad or not np.isfinite(losses[k]):
            return k + 1, bad
    return S, 0


@jit
def _mlp_predict_rows(x, sizes, off, act, theta, acts, aoff, out, i0):
    """out[i0 + i] = argmax of the net's scores for row i of x (numpy.argmax's choice)."""
    B = x.shape[0]
    L = sizes.size - 1
    for k in range(L):
        W, b = _weights(theta, sizes, off, k)
        _affine(x if k == 0 else _rows_view(acts, aoff, k - 1, B), W, b, _rows_view(acts, aoff, k, B),
                act if k < L - 1 else 0)
    _argmax_rows(_rows_view(acts, aoff, L - 1, B), out, i0)


@jit
def _argmax_rows(s, out, i0):
    for i in range(s.shape[0]):
        k = 0
        best = s[i, 0]
        if best == best:
            for c in range(1, s.shape[1]):
                v = s[i, c]
                if v != v:
                    k = c
                    break
                if v > best:
                    best = v
                    k = c
        out[i0 + i] = k


#: rows labelled at a time by predict_mlp (their activations stay in cache)
PREDICT_ROWS = 256


@jit
def _predict_mlp(X, div, sizes, act, theta, out):
    n = X.shape[0]
    off = _mlp_offsets(sizes)
    m = min(PREDICT_ROWS, n)
    aoff = _act_offsets(sizes, m)
    xb = np.empty((m, sizes[0]), theta.dtype)
    acts = np.empty(aoff[-1], theta.dtype)
    rows = np.arange(n)
    for i in range(0, n, m):
        e = min(i + m, n)
        if e - i < m:
            m = e - i
            aoff = _act_offsets(sizes, m)
            xb = xb[:m]
        _gather(X, rows[i:e], div, xb)
        _mlp_predict_rows(xb, sizes, off, act, theta, acts, aoff, out, i)


#: rows of a thread's run labelled at a time by sparse_predict_mlp (their outputs stay in
#: the core's cache between the layers)
PREDICT_BLOCK = 64


@njit(cache=True, nogil=True, parallel=True)
def _sparse_predict_mlp_par(indptr, indices, data, lut, row0, sizes, act, theta, out, cut):
    """Labels of CSR rows row0 + i, run t of them (cut[t]:cut[t+1]) on thread t,
    PREDICT_BLOCK rows at a time: the first layer over the non-zeros, the rest dense."""
    nt = cut.size - 1
    bad = np.zeros(nt, np.int64)
    empty = np.empty(0, np.int64)
    off = _mlp_offsets(sizes)
    L = sizes.size - 1
    W0, b0 = _weights(theta, sizes, off, 0)
    for t in prange(nt):
        full = _act_offsets(sizes, PREDICT_BLOCK)
        acts = np.empty(full[-1], theta.dtype)
        i = cut[t]
        while i < cut[t + 1]:
            m = min(PREDICT_BLOCK, cut[t + 1] - i)
            aoff = _act_offsets(sizes, m)
            h = _rows_view(acts, aoff, 0, m)
            bad[t] += _sp_forward_rows(indptr, indices, data, lut, empty, row0 + i, 0, m, W0, b0, h,
                                       act if L > 1 else 0)
            for k in range(1, L):
                W, b = _weights(theta, sizes, off, k)
                _affine(_rows_view(acts, aoff, k - 1, m), W, b, _rows_view(acts, aoff, k, m),
                        act if k < L - 1 else 0)
            _argmax_rows(_rows_view(acts, aoff, L - 1, m), out, i)
            i += m
    return bad.sum()


# ------------------------------------------------------------------ numerical gradient, any depth
# The book's central difference for every parameter of theta, with the same two losses
# per parameter but only what the parameter changes recomputed, in float64: a weight
# W_k[i, j] moves unit j of layer k's pre-activation by d * a[r, i] in the rows r whose
# input a[r, i] is not 0 (the other rows' losses are unchanged, their difference 0);
# above it only that row, from a rank-one change of layer k + 1 on.
@inline
def _scores_row_loss(s, n, t):
    """-log(softmax(s[:n])[t] + 1e-7), subtracting the row's maximum as softmax does."""
    m = s[0]
    for c in range(1, n):
        if s[c] > m or m != m:
            m = s[c]
    e = 0.0
    for c in range(n):
        e += np.exp(s[c] - m)
    return -np.log(np.exp(s[t] - m) / e + LOG_EPS)


@inline
def _act64(v, act):
    if act == RELU:
        return 0.0 if v <= 0 else v  # NaN stays NaN, as in the reference
    return 1.0 / (1.0 + np.exp(-v))


@jit
def _loss_after(r, k, j, dz, sizes, off, W64, Z, A, aoff, B, act, t, bufs, base):
    """Row r's loss when unit j of layer k's pre-activation moves by dz."""
    L = sizes.size - 1
    if k == L - 1:
        C = sizes[L]
        s = bufs[0]
        Zk = _rows_view(Z, aoff, k, B)
        for c in range(C):
            s[c] = Zk[r, c]
        s[j] += dz
        return _scores_row_loss(s, C, t[r])
    Zk, Ak = _rows_view(Z, aoff, k, B), _rows_view(A, aoff, k, B)
    delta = _act64(Zk[r, j] + dz, act) - Ak[r, j]
    if delta == 0:
        return base[r]
    W = _weights(W64, sizes, off, k + 1)[0]
    Z1 = _rows_view(Z, aoff, k + 1, B)
    n = sizes[k + 2]
    cur = bufs[0]
    for c in range(n):
        cur[c] = Z1[r, c] + delta * W[j, c]
    for m in range(k + 2, L + 1):
        if m == L:
            return _scores_row_loss(cur, n, t[r])
        for c in range(n):
            cur[c] = _act64(cur[c], act)
        W, b = _weights(W64, sizes, off, m)
        nxt = bufs[(m - k - 1) % 2]
        n_out = sizes[m + 1]
        for c in range(n_out):
            nxt[c] = b[c]
        for q in range(n):
            v = cur[q]
            if v != 0:
                for c in range(n_out):
                    nxt[c] += v * W[q, c]
        cur, n = nxt, n_out
    return 0.0  # not reached


# Where it holds, a move is not propagated unit by unit: moving unit j of layer k by
# delta moves the row's scores by delta * M[j, :], M the product of the weights above
# with the row's active ReLUs between them.  That holds while no ReLU above changes
# side; the limit kept per row and unit is half the smallest |z_m[r, q]| / |N_m[j, q]|
# over the hidden layers m above (N_m the map to layer m), and a move at or beyond it
# is propagated (_loss_after).  The same rule as _numgrad.pxi on the Cython side.
# read at each call: False propagates every move (the tests compare); the maps' budget
NUMGRAD_LINEAR = True
NUMGRAD_MAP_BYTES = 1 << 25  # at most this much of maps per chunk of batch rows


@jit
def _finite(a):
    for v in a:
        if not (v - v == 0):
            return False
    return True


@jit
def _ng_limit(lim, N, z):
    """lim[j] = min(lim[j], half the smallest |z[q]| / |N[j, q]|); 0 where that is NaN."""
    for j in range(N.shape[0]):
        for q in range(N.shape[1]):
            b = abs(N[j, q])
            if b != 0:
                v = 0.5 * abs(z[q]) / b
                if v != v:
                    v = 0.0
                if v < lim[j]:
                    lim[j] = v


@jit
def _ng_layout(sizes, rows):
    """Where layer k's maps (rows, C, n_k) and limits (rows, n_k) start in one buffer."""
    L = sizes.size - 1
    moff, loff = np.zeros(L, np.int64), np.zeros(L, np.int64)
    at = 0
    for k in range(L):
        moff[k] = at
        at += rows * sizes[L] * sizes[k + 1] if k < L - 1 else 0
        loff[k] = at
        at += rows * sizes[k + 1]
    return moff, loff, at


@jit
def _ng_maps(r0, rows, sizes, off, W64, Z, aoff, B, mapped, maps, moff, loff):
    """Each row's maps and limits for batch rows r0 .. r0 + rows - 1."""
    L = sizes.size - 1
    C = sizes[L]
    for rr in range(rows):
        r = r0 + rr
        ok = True
        for m in range(L):
            ok = ok and _finite(_rows_view(Z, aoff, m, B)[r])
        for k in range(L):
            nk = sizes[k + 1]
            lim = maps[loff[k] + rr * nk:loff[k] + (rr + 1) * nk]
            lim[:] = np.inf if ok and mapped[k] else 0.0
            if not (ok and mapped[k]) or k == L - 1:
                continue
            N = _weights(W64, sizes, off, k + 1)[0]
            for m in range(k + 1, L):
                if m > k + 1:  # N_m = N_{m-1}[:, active] W_m[active, :]
                    active = np.flatnonzero(_rows_view(Z, aoff, m - 1, B)[r] > 0)
                    Wm = _weights(W64, sizes, off, m)[0]
                    N = np.dot(np.ascontiguousarray(N[:, active]), np.ascontiguousarray(Wm[active, :])) \
                        if active.size else np.zeros((nk, sizes[m + 1]))
                if m < L - 1:
                    _ng_limit(lim, N, _rows_view(Z, aoff, m, B)[r])
            mt = maps[moff[k] + rr * C * nk:moff[k] + (rr + 1) * C * nk].reshape((C, nk))
            for j in range(nk):  # N is now the map to the scores
                if not _finite(N[j]):
                    lim[j] = 0.0
                for c in range(C):
                    mt[c, j] = N[j, c]


@jit
def _ng_losses(z, mt, delta, t, s, m, e, loss):
    """loss[j] = -log(softmax(z + delta[j] * mt[:, j])[t] + 1e-7), each softmax as
    _scores_row_loss computes it; the loops run along the units."""
    C, n = mt.shape
    for q in range(C):
        for j in range(n):
            s[q, j] = z[q] + delta[j] * mt[q, j]
    for j in range(n):
        m[j] = s[0, j]
        e[j] = 0.0
    for q in range(1, C):
        for j in range(n):
            if s[q, j] > m[j] or m[j] != m[j]:
                m[j] = s[q, j]
    for q in range(C):
        for j in range(n):
            e[j] += _exp64(s[q, j] - m[j])
    for j in range(n):
        loss[j] = -np.log(_exp64(s[t, j] - m[j]) / e[j] + LOG_EPS)


@jit
def _ng_row_losses(k, r, rr, d, v, sizes, off, act, W64, Z, A, aoff, B, t, base, mapped, maps, moff, loff,
                   ident, delta, s, m, e, bufs, loss):
    """loss[j]: row r's loss with unit j of layer k's pre-activation moved by d[j] * v."""
    L = sizes.size - 1
    nk, C = sizes[k + 1], sizes[L]
    Zk, Ak = _rows_view(Z, aoff, k, B), _rows_view(A, aoff, k, B)
    for j in range(nk):
        dz = d[j] * v
        delta[j] = dz if k == L - 1 else _act64(Zk[r, j] + dz, act) - Ak[r, j]
    lim = maps[loff[k] + rr * nk:loff[k] + (rr + 1) * nk]
    if mapped[k]:
        mt = ident if k == L - 1 else maps[moff[k] + rr * C * nk:moff[k] + (rr + 1) * C * nk].reshape((C, nk))
        _ng_losses(_rows_view(Z, aoff, L - 1, B)[r], mt, delta, t[r], s, m, e, loss)
    for j in range(nk):
        if delta[j] == 0:
            loss[j] = base[r]
        elif not (abs(delta[j]) < lim[j]):
            loss[j] = _loss_after(r, k, j, d[j] * v, sizes, off, W64, Z, A, aoff, B, act, t, bufs, base)


@jit
def _numgrad_input(i, k, a_in, sizes, off, act, theta, W64, Z, A, aoff, t, h, base, G, width, r0, rows,
                   mapped, maps, moff, loff, ident):
    """Add rows r0 .. r0 + rows - 1's loss differences to G for row i of W_k (i an input
    of layer k), or for b_k when i < 0."""
    B = a_in.shape[0]
    nk, C = sizes[k + 1], sizes[sizes.size - 1]
    o = off[k] + i * nk if i >= 0 else off[k] + sizes[k] * nk
    bufs = np.empty((2, width))
    d = np.empty((2, nk))
    lp, lm, delta, m, e = np.empty(nk), np.empty(nk), np.empty(nk), np.empty(nk), np.empty(nk)
    s = np.empty((C, nk))
    moved = np.empty(3, theta.dtype)
    for j in range(nk):
        moved[2] = theta[o + j]
        moved[0] = moved[2] + h  # the perturbed parameter as the book's array holds it
        moved[1] = moved[2] - h
        d[0, j] = np.float64(moved[0]) - np.float64(moved[2])
        d[1, j] = np.float64(moved[1]) - np.float64(moved[2])
    for rr in range(rows):
        r = r0 + rr
        v = a_in[r, i] if i >= 0 else 1.0
        if v == 0:
            continue
        _ng_row_losses(k, r, rr, d[0], v, sizes, off, act, W64, Z, A, aoff, B, t, base, mapped, maps, moff,
                       loff, ident, delta, s, m, e, bufs, lp)
        _ng_row_losses(k, r, rr, d[1], v, sizes, off, act, W64, Z, A, aoff, B, t, base, mapped, maps, moff,
                       loff, ident, delta, s, m, e, bufs, lm)
        for j in range(nk):
            G[o + j] += lp[j] - lm[j]


@njit(cache=True, nogil=True, parallel=True)
def _numgrad_mlp(x, t, sizes, act, theta, h, grad, linear, map_bytes):
    B = x.shape[0]
    L = sizes.size - 1
    off, aoff = _mlp_offsets(sizes), _act_offsets(sizes, B)
    W64 = theta.astype(np.float64)
    x64 = x.astype(np.float64)
    Z, A = np.empty(aoff[-1]), np.empty(aoff[-1])
    for k in range(L):
        W, b = _weights(W64, sizes, off, k)
        z = _rows_view(Z, aoff, k, B)
        np.dot(x64 if k == 0 else _rows_view(A, aoff, k - 1, B), W, z)
        a = _rows_view(A, aoff, k, B)
        for r in range(B):
            for c in range(sizes[k + 1]):
                z[r, c] += b[c]
                a[r, c] = _act64(z[r, c], act)
    base = np.empty(B)
    top = _rows_view(Z, aoff, L - 1, B)
    for r in range(B):
        base[r] = _scores_row_loss(top[r], sizes[L], t[r])
    if np.isnan(base).any():  # the book's mean loss is NaN at every move: so is each entry
        grad[:] = np.nan
        return
    width = sizes.max()
    C = sizes[L]
    linear = linear and _finite(W64)
    mapped = np.zeros(L, np.bool_)
    for k in range(L):
        mapped[k] = linear and (k >= L - 2 or act == RELU)
    chunk = max(1, min(B, map_bytes // (8 * _ng_layout(sizes, 1)[2])))
    moff, loff, size = _ng_layout(sizes, chunk)
    maps = np.zeros(size)
    ident = np.eye(C)
    G = np.zeros(theta.size)
    for r0 in range(0, B, chunk):  # chunk by chunk: each entry of G sums its rows in order
        rows = min(chunk, B - r0)
        _ng_maps(r0, rows, sizes, off, W64, Z, aoff, B, mapped, maps, moff, loff)
        for k in range(L):
            a_in = x64 if k == 0 else _rows_view(A, aoff, k - 1, B)
            for i in prange(-1, sizes[k]):
                _numgrad_input(i, k, a_in, sizes, off, act, theta, W64, Z, A, aoff, t, h, base, G, width, r0,
                               rows, mapped, maps, moff, loff, ident)
    for p in range(theta.size):
        grad[p] = G[p] / B / (2.0 * h)


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
    return float(_ce_labels_call(y, chk.labels(t, *y.shape)))


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
    if chk.ready(x, y, t) and _labels_in_range(t, x.shape[1]):
        return float(_softmax_ce_labels(x, t, y))
    dt = chk.dtype_of(x, "x")
    x = chk.inp(x, dt, "x")
    return float(_softmax_ce_labels(x, chk.labels(t, *x.shape), chk.out(y, dt, "y", x.shape)))


def softmax_loss_onehot(x, t, y):
    return cross_entropy_onehot(softmax(x, y), t)


def softmax_loss_backward_labels(y, t, dout, dx):
    if chk.ready(y, dx, t) and _labels_in_range(t, y.shape[1]):
        _sl_backward_labels(y, t, float(dout), dx)
        return dx
    dt = chk.dtype_of(y, "y")
    y = chk.inp(y, dt, "y")
    _sl_backward_labels(y, chk.labels(t, *y.shape), float(dout), chk.out(dx, dt, "dx", y.shape))
    return dx


def softmax_loss_backward_onehot(y, t, dout, dx):
    dt = chk.dtype_of(y, "y")
    y, t = chk.inp(y, dt, "y"), chk.inp(t, dt, "t")
    chk.same_shape(y, t, "y", "t")
    _sl_backward_onehot(y, t, float(dout), chk.out(dx, dt, "dx", y.shape))
    return dx


def _pixel_table(dtype):
    """lut[u] = u / 255 in the working dtype (what load_mnist(normalize=True) computes)."""
    return np.arange(256, dtype=dtype) / dtype.type(255)


_LUTS = {np.dtype(np.float32): _pixel_table(np.dtype(np.float32)),
         np.dtype(np.float64): _pixel_table(np.dtype(np.float64))}


def _threads():
    import numba

    return numba.get_num_threads()


def get_num_threads():
    """How many threads the kernels called from this thread may use (Numba's setting:
    ``NUMBA_NUM_THREADS``, else one per core)."""
    return _threads()


def set_num_threads(n):
    """Let the kernels called from this thread use ``n`` threads from now on
    (``numba.set_num_threads``: at most ``NUMBA_NUM_THREADS``).  No kernel's result
    depends on it."""
    import numba

    numba.set_num_threads(chk.threads(n, numba.config.NUMBA_NUM_THREADS, "NUMBA_NUM_THREADS"))


def sparse_rows(X):
    if not isinstance(X, np.ndarray):
        raise TypeError(f"X must be a numpy array, got {type(X).__name__}")
    if X.dtype not in (np.uint8, np.float32, np.float64):
        raise TypeError(f"X must be uint8, float32 or float64, got {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    if X.shape[1] >= 2**31:
        raise ValueError(f"X has {X.shape[1]} columns; column indices are int32")
    return _sparse_rows(np.ascontiguousarray(X))


def sparse_affine(indptr, indices, data, row0, W, b, act, out):
    chk.activation(act, identity=True)
    dt = chk.dtype_of(W, "W")
    chk.csr(indptr, indices, data, dt, "sparse_affine")
    W = chk.inp(W, dt, "W")
    b = chk.inp(b, dt, "b", ndim=1)
    if b.shape != (W.shape[1],):
        raise ValueError(f"b has shape {b.shape}, expected ({W.shape[1]},)")
    n = out.shape[0] if getattr(out, "ndim", 0) == 2 else -1
    chk.out(out, dt, "out", (n, W.shape[1]))
    if row0 < 0 or row0 + n > indptr.shape[0] - 1:
        raise IndexError(f"rows [{row0}, {row0 + n}) are out of range for {indptr.shape[0] - 1} rows")
    bad = _sparse_affine(indptr, indices, data, _LUTS[dt], int(row0), W, b, int(act), out, _threads())
    if bad:
        raise ValueError(f"sparse_affine: column indices outside [0, {W.shape[0]})")
    return out


def _div(X, dtype):
    return dtype.type(255.0 if X.dtype == np.uint8 else 1.0)


def train_steps_mlp(X, T, idx, sizes, act, theta, opt, state, losses):
    X, T, idx, sizes = chk.mlp_steps(X, T, idx, sizes, act, theta, opt, state, losses)
    return int(_mlp_steps(X, _div(X, theta.dtype), T, idx, sizes, int(act), theta, opt, state, losses))


def train_steps_mlp_sparse(indptr, indices, data, T, idx, sizes, act, theta, opt, state, losses):
    _, T, idx, sizes = chk.mlp_steps(None, T, idx, sizes, act, theta, opt, state, losses, (indptr, indices, data))
    lut = _LUTS[theta.dtype]
    if (sizes.shape[0] == 3 and opt[OPT_KIND] == Opt.SGD and opt[OPT_DECAY] == 0 and theta.dtype == np.float32
            and PAD - 16 < sizes[1] <= PAD):
        D, H, C = (int(v) for v in sizes)
        B = idx.shape[1]
        (W1, b1), (W2, b2) = mlp_views(sizes, theta)
        dt = theta.dtype
        h, s, dh = np.empty((B, H), dt), np.empty((B, C), dt), np.empty((B, H), dt)
        db1, dW2, db2 = np.empty(H, dt), np.empty((H, C), dt), np.empty(C, dt)
        with one_thread():
            done, bad = _train_steps_2layer_sparse_pad(
                indptr, indices, data, lut, T, idx, W1, b1, W2, b2, float(opt[OPT_LR]), int(act), _threads(),
                h, s, dh, db1, dW2, db2, losses, _aligned_zeros((D, PAD), dt), _aligned_zeros(PAD, dt),
                _aligned_zeros((B, PAD), dt), _aligned_zeros((B, PAD), dt))
    else:
        with one_thread():
            done, bad = _mlp_steps_sparse(indptr, indices, data, lut, T, idx, sizes, int(act), theta, opt, state,
                                          losses, _threads())
    if bad:
        raise ValueError(f"train_steps_mlp_sparse: column indices outside [0, {sizes[0]}) "
                         "(the weights may be partly updated)")
    return int(done)


def mlp_gradient(X, T, idx, sizes, act, theta, decay, grad):
    X, T, idx, sizes = chk.mlp_gradient(X, T, idx, sizes, act, theta, decay, grad)
    B, dt, outs = idx.shape[0], theta.dtype, idx.shape[0] * int(sizes[1:].sum())
    if X.dtype == dt and np.array_equal(idx, np.arange(B)):  # X's first B rows as they are: read in place
        xb = X[:B]
    else:
        xb = buffer("batch", B * int(sizes[0]), dt).reshape(B, int(sizes[0]))
        _gather(X, idx, _div(X, dt), xb)
    return float(_mlp_gradient(xb, T, idx, sizes, int(act), theta, float(decay), grad, buffer("acts", outs, dt),
                               buffer("deltas", outs, dt)))


def predict_mlp(X, sizes, act, theta, out):
    X, sizes = chk.mlp_predict(X, sizes, act, theta, out)
    if X.shape[0]:
        _predict_mlp(X, _div(X, theta.dtype), sizes, int(act), theta, out)
    return out


def sparse_predict_mlp(indptr, indices, data, row0, sizes, act, theta, out):
    _, sizes = chk.mlp_predict(None, sizes, act, theta, out, (indptr, indices, data), row0)
    n = out.shape[0]
    if n:
        cut = _split_rows(indptr, np.empty(0, np.int64), int(row0), n, _threads())
        with one_thread():
            bad = _sparse_predict_mlp_par(indptr, indices, data, _LUTS[theta.dtype], int(row0), sizes, int(act),
                                          theta, out, cut)
        if bad:
            raise ValueError(f"sparse_predict_mlp: column indices outside [0, {sizes[0]})")
    return out


def numerical_gradient_mlp(x, t, sizes, act, theta, h, grad):
    x, t, sizes = chk.mlp_numgrad(x, t, sizes, act, theta, h, grad)
    _numgrad_mlp(x, t, sizes, int(act), theta, float(h), grad, bool(NUMGRAD_LINEAR), int(NUMGRAD_MAP_BYTES))


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
        X, T, idx = np.ones((4, 3), dtype), np.zeros(4, np.int64), np.arange(2, dtype=np.int64)
        for hidden in ([2], [PAD - 14]):  # the padded two-layer SGD case: float32, PAD - 16 < H <= PAD
            sizes = np.array([3, *hidden, 2])
            theta = np.full(mlp_size(sizes), 0.1, dtype)
            state = np.zeros((2, theta.size), dtype)
            opt = np.array([Opt.SGD, 0.1, 0.9, 0.999, 0.0, 0.0])
            for rows in (X, X.astype(np.uint8)):
                csr = sparse_rows(rows)
                train_steps_mlp(rows, T, idx[None], sizes, RELU, theta, opt, state, np.empty(1))
                train_steps_mlp_sparse(*csr, T, idx[None], sizes, RELU, theta, opt, state, np.empty(1))
                opt[OPT_DECAY] = 0.01  # the general sparse engine
                train_steps_mlp_sparse(*csr, T, idx[None], sizes, RELU, theta, opt, state, np.empty(1))
                opt[OPT_DECAY] = 0.0
                mlp_gradient(rows, T, idx, sizes, RELU, theta, 0.0, np.empty_like(theta))
                predict_mlp(rows, sizes, RELU, theta, np.empty(4, np.int64))
                sparse_predict_mlp(*csr, 0, sizes, RELU, theta, np.empty(4, np.int64))
                sparse_affine(*csr, 0, W, b, RELU, np.empty((4, 2), dtype))
        numerical_gradient_mlp(x, t, np.array([3, 2, 2]), RELU, theta[: mlp_size([3, 2, 2])].copy(), 1e-4,
                               np.empty(mlp_size([3, 2, 2]), dtype))
    return time.perf_counter() - start
