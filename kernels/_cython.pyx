# Cython implementation of the kernel contract (see contract.py).
#
# Layout follows scikit-learn's sklearn/_loss: small ``cdef inline ... nogil`` element
# functions over a fused float type, loops over raw pointers, and a thin ``def`` layer
# that validates dtypes, shapes and contiguity once per call and then releases the GIL.
# Matrix products go to BLAS through scipy.linalg.cython_blas (sgemm/dgemm).
# Compiler directives are set once in setup.py (FASTNET_CYTHON_DEBUG=1 turns bounds
# checking back on).

cimport numpy as cnp
from libc.math cimport log
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport sgemm, dgemm

cdef extern from "_vmath.h" nogil:
    # vectorisable exp and sigmoid, in place (see _vmath.h)
    double fn_exp(double x)
    void fn_exp_inplace_d(double* y, Py_ssize_t n)
    void fn_exp_inplace_f(float* y, Py_ssize_t n)
    void fn_sigmoid_inplace_d(double* y, Py_ssize_t n)
    void fn_sigmoid_inplace_f(float* y, Py_ssize_t n)

import numpy as np

cnp.import_array()

NAME = "cython"

ctypedef fused real:
    float
    double

cdef double LOG_EPS = 1e-7


# ---------------------------------------------------------------- element functions
cdef inline void _exp_inplace(real* y, Py_ssize_t n) noexcept nogil:
    if real is float:
        fn_exp_inplace_f(y, n)
    else:
        fn_exp_inplace_d(y, n)


cdef inline real _relu(real v) noexcept nogil:
    # NaN stays NaN (v > 0 is false for NaN, so test the other way round)
    return 0 if v <= 0 else v


cdef void _gemm(bint ta, bint tb, int M, int N, int K, real alpha, real* A, int lda,
                real* B, int ldb, real beta, real* C, int ldc) noexcept nogil:
    """Row-major C(M,N) = alpha * op(A)(M,K) @ op(B)(K,N) + beta * C.

    Row-major C is column-major C^T = op(B)^T op(A)^T, hence B before A.
    """
    cdef char ca = b'T' if ta else b'N'
    cdef char cb = b'T' if tb else b'N'
    if real is float:
        sgemm(&cb, &ca, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc)
    else:
        dgemm(&cb, &ca, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc)


# ---------------------------------------------------------------- argument checks
cdef inline int _typenum(object a, str name) except -1:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    cdef int tn = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if tn != cnp.NPY_FLOAT32 and tn != cnp.NPY_FLOAT64:
        raise TypeError(f"{name} must be float32 or float64, got {(<cnp.ndarray>a).dtype}")
    return tn


cdef cnp.ndarray _in2(object a, int tn, str name):
    """A C-contiguous 2-D view of input ``a`` of type ``tn`` (a copy only if strided)."""
    if _typenum(a, name) != tn:
        raise TypeError(f"{name} is {a.dtype} but the other arrays are {"float32" if tn == cnp.NPY_FLOAT32 else "float64"}; "
                        "fastnet never mixes float32 and float64 in a kernel")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_NDIM(arr) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {(<object>arr).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        arr = np.ascontiguousarray(arr)
    return arr


cdef cnp.ndarray _out2(object a, int tn, str name, Py_ssize_t rows, Py_ssize_t cols):
    """Output ``a`` must already be C-contiguous, writeable, of type ``tn`` and shape (rows, cols)."""
    if _typenum(a, name) != tn:
        raise TypeError(f"{name} is {a.dtype}; expected the inputs' dtype")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_NDIM(arr) != 2 or arr.shape[0] != rows or arr.shape[1] != cols:
        raise ValueError(f"{name} has shape {(<object>arr).shape}, expected ({rows}, {cols})")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return arr


cdef cnp.ndarray _vec(object a, int tn, str name, Py_ssize_t n, bint writeable):
    if _typenum(a, name) != tn:
        raise TypeError(f"{name} is {a.dtype}; expected the inputs' dtype")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_NDIM(arr) != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} has shape {(<object>arr).shape}, expected ({n},)")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        if writeable:
            raise ValueError(f"{name} must be a writeable C-contiguous array")
        arr = np.ascontiguousarray(arr)
    if writeable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} must be writeable")
    return arr


cdef cnp.ndarray _labels(object t, Py_ssize_t n):
    cdef cnp.ndarray arr
    if (cnp.PyArray_Check(t) and cnp.PyArray_TYPE(<cnp.ndarray>t) == cnp.NPY_INT64
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>t)):
        arr = <cnp.ndarray>t
    else:
        arr = np.ascontiguousarray(t, dtype=np.int64)
    if cnp.PyArray_NDIM(arr) != 1 or arr.shape[0] != n:
        raise ValueError(f"labels have shape {(<object>arr).shape}, expected ({n},)")
    return arr


cdef inline void* _p(cnp.ndarray a) noexcept:
    return cnp.PyArray_DATA(a)


# ---------------------------------------------------------------- loops
cdef void _map_step(real* x, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = 1 if x[i] > 0 else 0


cdef void _map_sigmoid(real* x, real* out, Py_ssize_t n) noexcept nogil:
    if x != out:
        memcpy(out, x, n * sizeof(real))
    if real is float:
        fn_sigmoid_inplace_f(out, n)
    else:
        fn_sigmoid_inplace_d(out, n)


cdef void _map_relu(real* x, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = _relu(x[i])


cdef void _map_sigmoid_backward(real* dout, real* y, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = dout[i] * (1 - y[i]) * y[i]


cdef void _map_relu_backward(real* dout, real* y, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = 0 if y[i] <= 0 else dout[i]


cdef void _affine(real* x, real* W, real* b, real* out, int N, int D, int M,
                  int act) noexcept nogil:
    """out = act(x @ W + b); act 0 identity, 1 relu, 2 sigmoid."""
    cdef Py_ssize_t i, j
    for i in range(N):
        for j in range(M):
            out[i * M + j] = b[j]
    _gemm(False, False, N, M, D, <real>1, x, D, W, M, <real>1, out, M)
    if act == 1:
        _map_relu(out, out, <Py_ssize_t>N * M)
    elif act == 2:
        _map_sigmoid(out, out, <Py_ssize_t>N * M)


cdef void _affine_backward(real* x, real* W, real* dout, real* dW, real* db, real* dx,
                           int N, int D, int M) noexcept nogil:
    cdef Py_ssize_t i, j
    _gemm(True, False, D, M, N, <real>1, x, D, dout, M, <real>0, dW, M)
    for j in range(M):
        db[j] = 0
    for i in range(N):
        for j in range(M):
            db[j] += dout[i * M + j]
    if dx != NULL:
        _gemm(False, True, N, D, M, <real>1, dout, M, W, M, <real>0, dx, D)


cdef void _softmax(real* x, real* y, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """Row-wise: y = x - max(row); y = exp(y) over the whole block; y /= sum(row)."""
    cdef Py_ssize_t i, j
    cdef real m
    cdef double s
    for i in range(N):
        m = x[i * C]
        for j in range(1, C):
            if x[i * C + j] > m or m != m:
                m = x[i * C + j]
        for j in range(C):
            y[i * C + j] = x[i * C + j] - m
    _exp_inplace(y, N * C)
    for i in range(N):
        s = 0
        for j in range(C):
            s += y[i * C + j]
        for j in range(C):
            y[i * C + j] = <real>(y[i * C + j] / s)


cdef double _ce_labels(real* y, long long* t, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t i
    cdef double s = 0
    for i in range(N):
        s += log(<double>(y[i * C + t[i]] + <real>LOG_EPS))
    return -s / N


cdef double _ce_onehot(real* y, real* t, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t i
    cdef double s = 0
    for i in range(N * C):
        if t[i] != 0:
            s += t[i] * log(<double>(y[i] + <real>LOG_EPS))
    return -s / N


cdef void _sl_backward_labels(real* y, long long* t, double dout, real* dx,
                              Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef real scale = <real>(dout / N)
    for i in range(N):
        for j in range(C):
            dx[i * C + j] = y[i * C + j] * scale
        dx[i * C + t[i]] = (y[i * C + t[i]] - 1) * scale


cdef void _sl_backward_onehot(real* y, real* t, double dout, real* dx,
                              Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t i
    cdef real scale = <real>(dout / N)
    for i in range(N * C):
        dx[i] = (y[i] - t[i]) * scale


# ---------------------------------------------------------------- the kernel table
def _unary(x, out, int which):
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray oa = _out2(out, tn, "out", xa.shape[0], xa.shape[1])
    cdef Py_ssize_t n = cnp.PyArray_SIZE(xa)
    cdef void* px = _p(xa)
    cdef void* po = _p(oa)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            if which == 0:
                _map_step(<float*>px, <float*>po, n)
            elif which == 1:
                _map_sigmoid(<float*>px, <float*>po, n)
            else:
                _map_relu(<float*>px, <float*>po, n)
        else:
            if which == 0:
                _map_step(<double*>px, <double*>po, n)
            elif which == 1:
                _map_sigmoid(<double*>px, <double*>po, n)
            else:
                _map_relu(<double*>px, <double*>po, n)
    return out


def step(x, out):
    return _unary(x, out, 0)


def sigmoid(x, out):
    return _unary(x, out, 1)


def relu(x, out):
    return _unary(x, out, 2)


def _binary_backward(dout, y, out, int which):
    cdef int tn = _typenum(dout, "dout")
    cdef cnp.ndarray da = _in2(dout, tn, "dout")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    if ya.shape[0] != da.shape[0] or ya.shape[1] != da.shape[1]:
        raise ValueError(f"dout has shape {dout.shape} but y has shape {y.shape}")
    cdef cnp.ndarray oa = _out2(out, tn, "out", da.shape[0], da.shape[1])
    cdef Py_ssize_t n = cnp.PyArray_SIZE(da)
    cdef void* pd = _p(da)
    cdef void* py = _p(ya)
    cdef void* po = _p(oa)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            if which == 0:
                _map_sigmoid_backward(<float*>pd, <float*>py, <float*>po, n)
            else:
                _map_relu_backward(<float*>pd, <float*>py, <float*>po, n)
        else:
            if which == 0:
                _map_sigmoid_backward(<double*>pd, <double*>py, <double*>po, n)
            else:
                _map_relu_backward(<double*>pd, <double*>py, <double*>po, n)
    return out


def sigmoid_backward(dout, y, out):
    return _binary_backward(dout, y, out, 0)


def relu_backward(dout, y, out):
    return _binary_backward(dout, y, out, 1)


def _affine_act(x, W, b, out, int act):
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray Wa = _in2(W, tn, "W")
    cdef int N = xa.shape[0], D = xa.shape[1], M = Wa.shape[1]
    if Wa.shape[0] != D:
        raise ValueError(f"x has shape {x.shape} but W has shape {W.shape}: "
                         f"x's {D} columns must equal W's rows")
    cdef cnp.ndarray ba = _vec(b, tn, "b", M, False)
    cdef cnp.ndarray oa = _out2(out, tn, "out", N, M)
    if N == 0 or M == 0:
        return out
    cdef void* px = _p(xa)
    cdef void* pW = _p(Wa)
    cdef void* pb = _p(ba)
    cdef void* po = _p(oa)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _affine(<float*>px, <float*>pW, <float*>pb, <float*>po, N, D, M, act)
        else:
            _affine(<double*>px, <double*>pW, <double*>pb, <double*>po, N, D, M, act)
    return out


def affine(x, W, b, out):
    return _affine_act(x, W, b, out, 0)


def affine_relu(x, W, b, out):
    return _affine_act(x, W, b, out, 1)


def affine_sigmoid(x, W, b, out):
    return _affine_act(x, W, b, out, 2)


def affine_backward(x, W, dout, dW, db, dx=None):
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray Wa = _in2(W, tn, "W")
    cdef cnp.ndarray da = _in2(dout, tn, "dout")
    cdef int N = xa.shape[0], D = xa.shape[1], M = Wa.shape[1]
    if Wa.shape[0] != D or da.shape[0] != N or da.shape[1] != M:
        raise ValueError(f"x {x.shape}, W {W.shape} and dout {dout.shape} do not fit "
                         "x (N, D), W (D, M), dout (N, M)")
    cdef cnp.ndarray dWa = _out2(dW, tn, "dW", D, M)
    cdef cnp.ndarray dba = _vec(db, tn, "db", M, True)
    cdef cnp.ndarray dxa = None
    cdef void* pdx = NULL
    if dx is not None:
        dxa = _out2(dx, tn, "dx", N, D)
        pdx = _p(dxa)
    if N == 0 or D == 0 or M == 0:
        dW[...] = 0
        db[...] = 0
        return None
    cdef void* px = _p(xa)
    cdef void* pW = _p(Wa)
    cdef void* pd = _p(da)
    cdef void* pdW = _p(dWa)
    cdef void* pdb = _p(dba)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _affine_backward(<float*>px, <float*>pW, <float*>pd, <float*>pdW, <float*>pdb,
                             <float*>pdx, N, D, M)
        else:
            _affine_backward(<double*>px, <double*>pW, <double*>pd, <double*>pdW,
                             <double*>pdb, <double*>pdx, N, D, M)
    return None


def softmax(x, out):
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1]
    cdef cnp.ndarray oa = _out2(out, tn, "out", N, C)
    if C == 0:
        return out
    cdef void* px = _p(xa)
    cdef void* po = _p(oa)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _softmax(<float*>px, <float*>po, N, C)
        else:
            _softmax(<double*>px, <double*>po, N, C)
    return out


def cross_entropy_labels(y, t):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef Py_ssize_t N = ya.shape[0], C = ya.shape[1]
    cdef cnp.ndarray ta = _labels(t, N)
    cdef double r
    cdef void* py = _p(ya)
    cdef long long* pt = <long long*>_p(ta)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            r = _ce_labels(<float*>py, pt, N, C)
        else:
            r = _ce_labels(<double*>py, pt, N, C)
    return r


def cross_entropy_onehot(y, t):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef cnp.ndarray ta = _in2(t, tn, "t")
    cdef Py_ssize_t N = ya.shape[0], C = ya.shape[1]
    if ta.shape[0] != N or ta.shape[1] != C:
        raise ValueError(f"y has shape {y.shape} but t has shape {t.shape}")
    cdef double r
    cdef void* py = _p(ya)
    cdef void* pt = _p(ta)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            r = _ce_onehot(<float*>py, <float*>pt, N, C)
        else:
            r = _ce_onehot(<double*>py, <double*>pt, N, C)
    return r


def sum_squared_error(y, t):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef cnp.ndarray ta = _in2(t, tn, "t")
    if ta.shape[0] != ya.shape[0] or ta.shape[1] != ya.shape[1]:
        raise ValueError(f"y has shape {y.shape} but t has shape {t.shape}")
    cdef Py_ssize_t i, n = cnp.PyArray_SIZE(ya)
    cdef double s = 0, d
    cdef float* fy = <float*>_p(ya)
    cdef float* ft = <float*>_p(ta)
    cdef double* dy = <double*>_p(ya)
    cdef double* dt = <double*>_p(ta)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            for i in range(n):
                d = fy[i] - ft[i]
                s += d * d
        else:
            for i in range(n):
                d = dy[i] - dt[i]
                s += d * d
    return 0.5 * s


def softmax_loss_labels(x, t, y):
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1]
    cdef cnp.ndarray ta = _labels(t, N)
    cdef cnp.ndarray ya = _out2(y, tn, "y", N, C)
    cdef double r
    cdef void* px = _p(xa)
    cdef void* py = _p(ya)
    cdef long long* pt = <long long*>_p(ta)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _softmax(<float*>px, <float*>py, N, C)
            r = _ce_labels(<float*>py, pt, N, C)
        else:
            _softmax(<double*>px, <double*>py, N, C)
            r = _ce_labels(<double*>py, pt, N, C)
    return r


def softmax_loss_onehot(x, t, y):
    softmax(x, y)
    return cross_entropy_onehot(y, t)


def softmax_loss_backward_labels(y, t, double dout, dx):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef Py_ssize_t N = ya.shape[0], C = ya.shape[1]
    cdef cnp.ndarray ta = _labels(t, N)
    cdef cnp.ndarray da = _out2(dx, tn, "dx", N, C)
    cdef void* py = _p(ya)
    cdef long long* pt = <long long*>_p(ta)
    cdef void* pd = _p(da)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _sl_backward_labels(<float*>py, pt, dout, <float*>pd, N, C)
        else:
            _sl_backward_labels(<double*>py, pt, dout, <double*>pd, N, C)
    return dx


def softmax_loss_backward_onehot(y, t, double dout, dx):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef cnp.ndarray ta = _in2(t, tn, "t")
    cdef Py_ssize_t N = ya.shape[0], C = ya.shape[1]
    if ta.shape[0] != N or ta.shape[1] != C:
        raise ValueError(f"y has shape {y.shape} but t has shape {t.shape}")
    cdef cnp.ndarray da = _out2(dx, tn, "dx", N, C)
    cdef void* py = _p(ya)
    cdef void* pt = _p(ta)
    cdef void* pd = _p(da)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _sl_backward_onehot(<float*>py, <float*>pt, dout, <float*>pd, N, C)
        else:
            _sl_backward_onehot(<double*>py, <double*>pt, dout, <double*>pd, N, C)
    return dx


# ---------------------------------------------------------------- fused training step
cdef void _gather_rows(real* X, unsigned char* U, long long* idx, real* xb, int B, int D) noexcept nogil:
    """xb[i] = X[idx[i]], or U[idx[i]] / 255 for uint8 pixels (load_mnist's normalisation)."""
    cdef Py_ssize_t i, j
    cdef unsigned char* row
    cdef real* out
    for i in range(B):
        if U == NULL:
            memcpy(&xb[i * D], &X[idx[i] * D], D * sizeof(real))
        else:
            row = &U[idx[i] * D]
            out = &xb[i * D]
            for j in range(D):
                out[j] = (<real>row[j]) / <real>255


cdef double _train_step_2layer(real* X, unsigned char* U, long long* T, long long* idx, real* W1, real* b1,
                               real* W2, real* b2, double lr, int act, real* xb, real* h,
                               real* s, real* dh, real* dW1, real* db1, real* dW2, real* db2,
                               int B, int D, int H, int C) noexcept nogil:
    """One SGD step of Affine-act-Affine-SoftmaxWithLoss.  With lr != 0 the weight
    updates are folded into the gradient products (gemm with alpha = -lr, beta = 1),
    so dW1 and dW2 are never materialised."""
    cdef Py_ssize_t i, j
    cdef long long t
    cdef double loss = 0, scale = 1.0 / B
    cdef real rs = <real>scale
    _gather_rows(X, U, idx, xb, B, D)
    _affine(xb, W1, b1, h, B, D, H, act)
    _affine(h, W2, b2, s, B, H, C, 0)
    _softmax(s, s, B, C)
    for i in range(B):
        t = T[idx[i]]
        loss -= log(<double>(s[i * C + t] + <real>LOG_EPS))
        for j in range(C):
            s[i * C + j] = s[i * C + j] * rs
        s[i * C + t] = s[i * C + t] - rs
    # dh = ds @ W2.T (with the old W2), then the activation's derivative
    _gemm(False, True, B, H, C, <real>1, s, C, W2, C, <real>0, dh, H)
    if act == 1:
        _map_relu_backward(dh, h, dh, <Py_ssize_t>B * H)
    else:
        _map_sigmoid_backward(dh, h, dh, <Py_ssize_t>B * H)
    for j in range(C):
        db2[j] = 0
    for i in range(B):
        for j in range(C):
            db2[j] += s[i * C + j]
    for j in range(H):
        db1[j] = 0
    for i in range(B):
        for j in range(H):
            db1[j] += dh[i * H + j]
    if lr != 0:
        _gemm(True, False, H, C, B, <real>(-lr), h, H, s, C, <real>1, W2, C)
        _gemm(True, False, D, H, B, <real>(-lr), xb, D, dh, H, <real>1, W1, H)
        for j in range(C):
            b2[j] -= <real>lr * db2[j]
        for j in range(H):
            b1[j] -= <real>lr * db1[j]
    else:
        _gemm(True, False, H, C, B, <real>1, h, H, s, C, <real>0, dW2, C)
        _gemm(True, False, D, H, B, <real>1, xb, D, dh, H, <real>0, dW1, H)
    return loss / B


def train_step_2layer(X, T, idx, W1, b1, W2, b2, double lr, int act, work):
    if act != 1 and act != 2:
        raise ValueError(f"act must be 1 (relu) or 2 (sigmoid), got {act}")
    if len(work) != 8:
        raise ValueError(f"work must hold 8 buffers (xb, h, s, dh, dW1, db1, dW2, db2), got {len(work)}")
    cdef int tn = _typenum(W1, "W1")
    cdef cnp.ndarray W1a = _out2(W1, tn, "W1", W1.shape[0], W1.shape[1])
    cdef int D = W1a.shape[0], H = W1a.shape[1]
    cdef cnp.ndarray W2a = _out2(W2, tn, "W2", H, W2.shape[1] if W2.ndim == 2 else -1)
    cdef int C = W2a.shape[1]
    cdef cnp.ndarray b1a = _vec(b1, tn, "b1", H, True)
    cdef cnp.ndarray b2a = _vec(b2, tn, "b2", C, True)
    cdef cnp.ndarray Xa
    cdef bint pixels = cnp.PyArray_Check(X) and cnp.PyArray_TYPE(<cnp.ndarray>X) == cnp.NPY_UINT8
    if pixels:
        Xa = np.ascontiguousarray(X)
        if cnp.PyArray_NDIM(Xa) != 2:
            raise ValueError(f"X must be 2-D, got shape {X.shape}")
    else:
        Xa = _in2(X, tn, "X")
    if Xa.shape[1] != D:
        raise ValueError(f"X has shape {X.shape} but W1 has shape {W1.shape}")
    cdef Py_ssize_t n_rows = Xa.shape[0]
    cdef cnp.ndarray Ta = _labels(T, n_rows)
    cdef cnp.ndarray ia = np.ascontiguousarray(idx, dtype=np.int64)
    if cnp.PyArray_NDIM(ia) != 1 or ia.shape[0] < 1:
        raise ValueError("idx must be a non-empty 1-D array of row numbers")
    cdef int B = ia.shape[0]
    xb, h, s, dh, dW1, db1, dW2, db2 = work
    cdef cnp.ndarray xba = _out2(xb, tn, "xb", B, D)
    cdef cnp.ndarray ha = _out2(h, tn, "h", B, H)
    cdef cnp.ndarray sa = _out2(s, tn, "s", B, C)
    cdef cnp.ndarray dha = _out2(dh, tn, "dh", B, H)
    cdef cnp.ndarray dW1a = _out2(dW1, tn, "dW1", D, H)
    cdef cnp.ndarray db1a = _vec(db1, tn, "db1", H, True)
    cdef cnp.ndarray dW2a = _out2(dW2, tn, "dW2", H, C)
    cdef cnp.ndarray db2a = _vec(db2, tn, "db2", C, True)
    cdef long long* pi = <long long*>_p(ia)
    cdef long long* pt = <long long*>_p(Ta)
    cdef Py_ssize_t i
    for i in range(B):
        if pi[i] < 0 or pi[i] >= n_rows:
            raise IndexError(f"batch index {pi[i]} is out of range for X with {n_rows} rows")
        if pt[pi[i]] < 0 or pt[pi[i]] >= C:
            raise ValueError(f"label {pt[pi[i]]} of row {pi[i]} is out of range for {C} classes")
    cdef double loss
    cdef void* p[15]
    cdef unsigned char* pu = NULL
    cdef void* px = NULL
    if pixels:
        pu = <unsigned char*>_p(Xa)
    else:
        px = _p(Xa)
    p[:] = [px, _p(W1a), _p(b1a), _p(W2a), _p(b2a), _p(xba), _p(ha), _p(sa), _p(dha),
            _p(dW1a), _p(db1a), _p(dW2a), _p(db2a), NULL, NULL]
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            loss = _train_step_2layer(<float*>p[0], pu, pt, pi, <float*>p[1], <float*>p[2],
                                      <float*>p[3], <float*>p[4], lr, act, <float*>p[5],
                                      <float*>p[6], <float*>p[7], <float*>p[8], <float*>p[9],
                                      <float*>p[10], <float*>p[11], <float*>p[12], B, D, H, C)
        else:
            loss = _train_step_2layer(<double*>p[0], pu, pt, pi, <double*>p[1], <double*>p[2],
                                      <double*>p[3], <double*>p[4], lr, act, <double*>p[5],
                                      <double*>p[6], <double*>p[7], <double*>p[8], <double*>p[9],
                                      <double*>p[10], <double*>p[11], <double*>p[12], B, D, H, C)
    return loss


# ---------------------------------------------------------------- numerical gradient
cdef inline double _act_d(double v, int act) noexcept nogil:
    if act == 1:
        return 0.0 if v <= 0 else v
    return 1.0 / (1.0 + fn_exp(-v))


cdef inline double _row_loss(double* S, Py_ssize_t i, long long t, Py_ssize_t C, real* col_w,
                             double dz, Py_ssize_t col, double ds) noexcept nogil:
    """-log(softmax(S[i] + dz * col_w + ds * e_col)[t] + 1e-7) in double (col_w may be NULL)."""
    cdef Py_ssize_t c
    cdef double v, m = -1.0 / 0.0, total = 0, target = 0, e
    for c in range(C):
        v = S[i * C + c] + (dz * col_w[c] if col_w != NULL else 0.0) + (ds if c == col else 0.0)
        if v > m or m != m:
            m = v
    for c in range(C):
        v = S[i * C + c] + (dz * col_w[c] if col_w != NULL else 0.0) + (ds if c == col else 0.0)
        e = fn_exp(v - m)
        total = total + e
        if c == t:
            target = e
    return -log(target / total + LOG_EPS)


cdef void _numgrad_W1_row(real* x, long long* t, real* W1, real* W2, int act, double h,
                          double* A, double* Z, double* S, real* gW1, Py_ssize_t k,
                          Py_ssize_t B, Py_ssize_t D, Py_ssize_t H, Py_ssize_t C,
                          Py_ssize_t* rows) noexcept nogil:
    """Gradient of row k of W1: only samples with x[i, k] != 0 change, and with ReLU only
    those whose unit is on at w + h or w - h; the skipped ones give exactly 0, as the
    book's loop does."""
    cdef Py_ssize_t i, j, q, n = 0
    cdef double w, dp, dm, diff, xi, zp, zm
    for i in range(B):
        if x[i * D + k] != 0:
            rows[n] = i
            n = n + 1
    for j in range(H):
        if n == 0:
            gW1[k * H + j] = 0
            continue
        w = W1[k * H + j]
        dp = <double>(<real>(w + h)) - w
        dm = <double>(<real>(w - h)) - w
        diff = 0
        for q in range(n):
            i = rows[q]
            xi = x[i * D + k]
            zp = _act_d(A[i * H + j] + xi * dp, act) - Z[i * H + j]
            zm = _act_d(A[i * H + j] + xi * dm, act) - Z[i * H + j]
            if zp == 0 and zm == 0:
                continue
            diff = diff + (_row_loss(S, i, t[i], C, &W2[j * C], zp, -1, 0.0)
                           - _row_loss(S, i, t[i], C, &W2[j * C], zm, -1, 0.0))
        gW1[k * H + j] = <real>(diff / B / (2 * h))


cdef int _numgrad_2layer(real* x, long long* t, real* W1, real* b1, real* W2, real* b2, int act,
                         double h, real* gW1, real* gb1, real* gW2, real* gb2,
                         Py_ssize_t B, Py_ssize_t D, Py_ssize_t H, Py_ssize_t C) noexcept nogil:
    cdef double* A = <double*>malloc(B * H * sizeof(double))
    cdef double* Z = <double*>malloc(B * H * sizeof(double))
    cdef double* S = <double*>malloc(B * C * sizeof(double))
    cdef Py_ssize_t* rows
    cdef Py_ssize_t i, j, k, c
    cdef double acc, w, dp, dm, diff, zp, zm
    if A == NULL or Z == NULL or S == NULL:
        free(A); free(Z); free(S)
        return -1
    for i in range(B):
        for j in range(H):
            acc = 0
            for k in range(D):
                acc = acc + <double>x[i * D + k] * W1[k * H + j]
            A[i * H + j] = acc + b1[j]
            Z[i * H + j] = _act_d(A[i * H + j], act)
        for c in range(C):
            acc = 0
            for j in range(H):
                acc = acc + Z[i * H + j] * W2[j * C + c]
            S[i * C + c] = acc + b2[c]
    for k in prange(D, schedule="dynamic"):
        rows = <Py_ssize_t*>malloc(B * sizeof(Py_ssize_t))
        if rows != NULL:
            _numgrad_W1_row(x, t, W1, W2, act, h, A, Z, S, gW1, k, B, D, H, C, rows)
            free(rows)
    for j in range(H):
        w = b1[j]
        dp = <double>(<real>(w + h)) - w
        dm = <double>(<real>(w - h)) - w
        diff = 0
        for i in range(B):
            zp = _act_d(A[i * H + j] + dp, act) - Z[i * H + j]
            zm = _act_d(A[i * H + j] + dm, act) - Z[i * H + j]
            diff = diff + (_row_loss(S, i, t[i], C, &W2[j * C], zp, -1, 0.0)
                           - _row_loss(S, i, t[i], C, &W2[j * C], zm, -1, 0.0))
        gb1[j] = <real>(diff / B / (2 * h))
    for j in range(H):
        for c in range(C):
            w = W2[j * C + c]
            dp = <double>(<real>(w + h)) - w
            dm = <double>(<real>(w - h)) - w
            diff = 0
            for i in range(B):
                diff = diff + (_row_loss(S, i, t[i], C, <real*>NULL, 0.0, c, Z[i * H + j] * dp)
                               - _row_loss(S, i, t[i], C, <real*>NULL, 0.0, c, Z[i * H + j] * dm))
            gW2[j * C + c] = <real>(diff / B / (2 * h))
    for c in range(C):
        w = b2[c]
        dp = <double>(<real>(w + h)) - w
        dm = <double>(<real>(w - h)) - w
        diff = 0
        for i in range(B):
            diff = diff + (_row_loss(S, i, t[i], C, <real*>NULL, 0.0, c, dp)
                           - _row_loss(S, i, t[i], C, <real*>NULL, 0.0, c, dm))
        gb2[c] = <real>(diff / B / (2 * h))
    free(A); free(Z); free(S)
    return 0


def numerical_gradient_2layer(x, t, W1, b1, W2, b2, int act, double h, gW1, gb1, gW2, gb2):
    if act != 1 and act != 2:
        raise ValueError(f"act must be 1 (relu) or 2 (sigmoid), got {act}")
    cdef int tn = _typenum(W1, "W1")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray W1a = _in2(W1, tn, "W1")
    cdef cnp.ndarray W2a = _in2(W2, tn, "W2")
    cdef Py_ssize_t B = xa.shape[0], D = xa.shape[1], H = W2a.shape[0], C = W2a.shape[1]
    if W1a.shape[0] != D or W1a.shape[1] != H:
        raise ValueError(f"W1 has shape {W1.shape}, expected ({D}, {H}) (x {x.shape}, W2 {W2.shape})")
    cdef cnp.ndarray b1a = _vec(b1, tn, "b1", H, False)
    cdef cnp.ndarray b2a = _vec(b2, tn, "b2", C, False)
    cdef cnp.ndarray ta = _labels(t, B)
    cdef long long* pt = <long long*>_p(ta)
    cdef Py_ssize_t i
    for i in range(B):
        if pt[i] < 0 or pt[i] >= C:
            raise ValueError(f"label {pt[i]} is out of range for {C} classes")
    cdef cnp.ndarray g1 = _out2(gW1, tn, "gW1", D, H)
    cdef cnp.ndarray g2 = _vec(gb1, tn, "gb1", H, True)
    cdef cnp.ndarray g3 = _out2(gW2, tn, "gW2", H, C)
    cdef cnp.ndarray g4 = _vec(gb2, tn, "gb2", C, True)
    cdef void* p[10]
    p[:] = [_p(xa), _p(W1a), _p(b1a), _p(W2a), _p(b2a), _p(g1), _p(g2), _p(g3), _p(g4), NULL]
    cdef int status
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            status = _numgrad_2layer(<float*>p[0], pt, <float*>p[1], <float*>p[2], <float*>p[3],
                                     <float*>p[4], act, h, <float*>p[5], <float*>p[6],
                                     <float*>p[7], <float*>p[8], B, D, H, C)
        else:
            status = _numgrad_2layer(<double*>p[0], pt, <double*>p[1], <double*>p[2], <double*>p[3],
                                     <double*>p[4], act, h, <double*>p[5], <double*>p[6],
                                     <double*>p[7], <double*>p[8], B, D, H, C)
    if status != 0:
        raise MemoryError("numerical_gradient_2layer: out of memory")
