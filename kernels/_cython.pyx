# Cython implementation of the kernel contract (see contract.py).
#
# Layout follows scikit-learn's sklearn/_loss: small ``cdef inline ... nogil`` element
# functions over a fused float type, loops over raw pointers, and a thin ``def`` layer
# that validates dtypes, shapes and contiguity once per call and then releases the GIL.
# Matrix products go to BLAS through scipy.linalg.cython_blas (sgemm/dgemm; see _load_blas).
# Compiler directives are set once in setup.py (FASTNET_CYTHON_DEBUG=1 turns bounds
# checking back on).

cimport numpy as cnp
from libc.limits cimport INT_MAX
from libc.math cimport log, pow, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from cython.parallel cimport parallel, prange, threadid
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer

cdef extern from "_sparse.h" nogil:
    # the first layer over CSR rows (see _sparse.h); W, b and G in the padded layout
    void fn_sparse_forward_f(const long long* indptr, const int* indices, const void* data, int pix,
                             const float* lut, long long row0, long long n,
                             const float* W, const float* b, float* out, long long D, long long H,
                             long long HP, long long* bad)
    void fn_sparse_forward_d(const long long* indptr, const int* indices, const void* data, int pix,
                             const double* lut, long long row0, long long n,
                             const double* W, const double* b, double* out, long long D, long long H,
                             long long HP, long long* bad)
    void fn_sparse_forward_cols_f(const long long* indptr, const int* indices, const void* data, int pix,
                                  const float* lut, const long long* rows, long long n, const float* W,
                                  const float* b, float* out, long long D, long long HP, int jlo, int jhi,
                                  long long* bad)
    void fn_sparse_forward_cols_d(const long long* indptr, const int* indices, const void* data, int pix,
                                  const double* lut, const long long* rows, long long n, const double* W,
                                  const double* b, double* out, long long D, long long HP, int jlo, int jhi,
                                  long long* bad)
    void fn_sparse_scatter_f(const long long* indptr, const int* indices, const void* data, int pix,
                             const float* lut, const long long* rows, long long n, const float* G,
                             float* W, long long D, long long H, long long HP, int jlo, int jhi,
                             long long* bad)
    void fn_sparse_scatter_d(const long long* indptr, const int* indices, const void* data, int pix,
                             const double* lut, const long long* rows, long long n, const double* G,
                             double* W, long long D, long long H, long long HP, int jlo, int jhi,
                             long long* bad)
    void fn_sum_parts_f(const float* parts, long long q, int np, long long n, long long H, long long HP,
                        float* h)
    void fn_sum_parts_d(const double* parts, long long q, int np, long long n, long long H, long long HP,
                        double* h)
    long long fn_padded(long long H, long long tsize)
    size_t fn_w_bytes(long long D, long long H, long long tsize, int split)
    void fn_w_rows(void* W, long long D, long long H, void* Wl, long long r0, long long r1, long long tsize,
                   int split, int back)
    void fn_pad_rows(const void* src, long long n, long long w, void* dst, long long wp, long long tsize)
    void fn_unpad_rows(const void* src, long long n, long long wp, void* dst, long long w, long long tsize)
    void* fn_scratch_take(size_t nbytes)
    void fn_scratch_give(void* p)
    int fn_max_threads()
    int fn_num_threads()
    void fn_set_max_threads(int n)
    void fn_barrier()

cdef extern from "_top.h" nogil:
    # a block of a sparse step's rows above the first layer, in vectors (see _top.h)
    int fn_top_fits_f(long long H, long long C)
    int fn_top_fits_d(long long H, long long C)
    void fn_top_weights_f(const float* W2, long long H, long long C, long long HP, float* wp, float* wt)
    void fn_top_weights_d(const double* W2, long long H, long long C, long long HP, double* wp, double* wt)
    double fn_top_block_f(const float* parts, long long q, int np, long long n, long long H, long long HP,
                          int act, const float* wp, const float* wt, const float* b2, const long long* Tl,
                          const long long* idx, long long C, long long B, float mlr, float* G, float* sums,
                          float* acc)
    double fn_top_block_d(const double* parts, long long q, int np, long long n, long long H, long long HP,
                          int act, const double* wp, const double* wt, const double* b2, const long long* Tl,
                          const long long* idx, long long C, long long B, double mlr, double* G, double* sums,
                          double* acc)

cdef extern from "_vmath.h" nogil:
    # vectorisable exp and sigmoid, in place (see _vmath.h)
    double fn_exp(double x)
    void fn_exp_inplace_d(double* y, Py_ssize_t n)
    void fn_exp_inplace_f(float* y, Py_ssize_t n)
    void fn_sigmoid_inplace_d(double* y, Py_ssize_t n)
    void fn_sigmoid_inplace_f(float* y, Py_ssize_t n)

import numpy as np
from importlib.util import find_spec as importlib_find_spec

from . import _blas as _blas_lib
from . import _checks as _chk
from ._checks import label_error
from ._checks import threads as _threads

cnp.import_array()

NAME = "cython"


def get_num_threads():
    """How many threads the kernels called from this thread may use (OpenMP's setting:
    ``OMP_NUM_THREADS``, else one per core; 1 when built without OpenMP)."""
    return fn_max_threads()


def set_num_threads(n):
    """Let the kernels called from this thread use ``n`` threads from now on (OpenMP's
    per-thread setting, as ``omp_set_num_threads``).  No kernel's result depends on it."""
    fn_set_max_threads(_threads(n))

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


ctypedef void (*_sgemm_t)(char* ta, char* tb, int* m, int* n, int* k, float* alpha, float* a,
                          int* lda, float* b, int* ldb, float* beta, float* c, int* ldc) noexcept nogil
ctypedef void (*_dgemm_t)(char* ta, char* tb, int* m, int* n, int* k, double* alpha, double* a,
                          int* lda, double* b, int* ldb, double* beta, double* c, int* ldc) noexcept nogil
cdef _sgemm_t sgemm = NULL
cdef _dgemm_t dgemm = NULL


def _cython_blas():
    """The module scipy.linalg.cython_blas.

    ``from scipy.linalg.cython_blas cimport sgemm`` would import it at start-up through
    the package scipy.linalg, whose __init__ imports all of scipy.linalg: 0.13 s here,
    more than a tenth of the chapter-5 experiment's training on this backend.  The
    module itself loads in 0.02 s, so it is loaded from its file and kept out of
    sys.modules: a later ``import scipy.linalg.cython_blas`` takes the normal way (and
    binds it in the package); tests/test_backend.py tries both orders.  Anything
    unexpected about the file (another scipy layout): the plain import."""
    import sys

    name = "scipy.linalg.cython_blas"
    if name in sys.modules:
        return sys.modules[name]
    try:
        import importlib.machinery
        import importlib.util
        import os

        scipy = importlib.util.find_spec("scipy")
        folder = os.path.join(os.path.dirname(scipy.origin), "linalg")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "cython_blas" + suffix)
            if os.path.isfile(path):
                break
        else:
            raise ImportError(f"no cython_blas extension in {folder}")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if sys.modules.get(name) is module:
            # loading an extension may register it; a later `import scipy.linalg.cython_blas`
            # must go the normal way, which also binds it in the package scipy.linalg
            del sys.modules[name]
        return module
    except Exception:
        from scipy.linalg import cython_blas

        return cython_blas


ctypedef int (*_threads_local_t)(int) noexcept nogil
# OpenBLAS's openblas_set_num_threads_local in each OpenBLAS loaded (_blas.py)
DEF MAX_BLAS_LIBS = 4
cdef _threads_local_t blas_threads_local[MAX_BLAS_LIBS]
cdef int n_blas_libs = 0


cdef int _load_blas() except -1:
    """sgemm and dgemm from the C-API capsules of scipy.linalg.cython_blas (what a
    cimport of them would read), and how to set the BLAS threads of a thread."""
    global sgemm, dgemm, n_blas_libs
    capi = _cython_blas().__pyx_capi__
    dgemm = <_dgemm_t>PyCapsule_GetPointer(capi["dgemm"], PyCapsule_GetName(capi["dgemm"]))
    sgemm = <_sgemm_t>PyCapsule_GetPointer(capi["sgemm"], PyCapsule_GetName(capi["sgemm"]))
    cdef size_t address
    n_blas_libs = 0
    for address in _blas_lib.openblas_threads_local()[:MAX_BLAS_LIBS]:
        blas_threads_local[n_blas_libs] = <_threads_local_t>address
        n_blas_libs += 1
    return 0


cdef void _blas_one_thread(int* had) noexcept nogil:
    """Let BLAS calls from this thread use one thread; had[i] receives what library i had
    (MAX_BLAS_LIBS entries).  The sparse kernels call BLAS between OpenMP regions, whose
    threads keep their cores busy for a while after a region ends; BLAS threads would
    then wait on them (a 784-100-100-10 step: 11 ms instead of 0.18 ms on this 2-core
    machine)."""
    cdef int i
    for i in range(n_blas_libs):
        had[i] = blas_threads_local[i](1)


cdef void _blas_threads_back(int* had) noexcept nogil:
    cdef int i
    for i in range(n_blas_libs):
        blas_threads_local[i](had[i])


def _blas_loaded():
    """Whether BLAS has been loaded in this process (for the tests of its lazy load)."""
    return sgemm != NULL and dgemm != NULL


cdef inline int _blas() except -1:
    """Load BLAS on the first kernel call that needs it, not at import: loading
    cython_blas imports the package scipy (0.02 s), and the sparse path of the chapter-5
    experiment (steps with the vector top, evaluation) never multiplies through BLAS.
    Every def that reaches _gemm calls this first (tests/test_backend.py calls each of
    them first in a fresh process)."""
    if sgemm == NULL or dgemm == NULL:
        _load_blas()
    return 0


if importlib_find_spec("scipy") is None:  # as an import of cython_blas would have failed
    raise ImportError("the Cython backend takes BLAS from SciPy: pip install scipy")


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


cdef cnp.ndarray _labels(object t, Py_ssize_t n, Py_ssize_t C):
    """Labels as C-contiguous int64 of shape (n,), each in [0, C): the kernels index
    rows by them without further checks."""
    cdef cnp.ndarray arr = _label_array(t, n)
    cdef long long* pt = <long long*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t i
    for i in range(n):
        if pt[i] < 0 or pt[i] >= C:
            raise ValueError(label_error(arr, C))
    return arr


cdef cnp.ndarray _label_array(object t, Py_ssize_t n):
    """Labels as C-contiguous int64 of shape (n,), not yet range-checked (the fused
    steps check only the labels of their batches' rows)."""
    cdef cnp.ndarray arr
    if (cnp.PyArray_Check(t) and cnp.PyArray_TYPE(<cnp.ndarray>t) == cnp.NPY_INT64
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>t)):
        arr = <cnp.ndarray>t
    else:
        arr = np.ascontiguousarray(t, dtype=np.int64)
    if cnp.PyArray_NDIM(arr) != 1 or arr.shape[0] != n:
        raise ValueError(f"labels have shape {(<object>arr).shape}, expected ({n},)")
    return arr


cdef int _blas_dim(cnp.ndarray a, int axis, str name) except -1:
    """Dimension ``axis`` of ``a`` as the C int that BLAS takes (refused when larger)."""
    cdef Py_ssize_t n = a.shape[axis]
    if n > INT_MAX:
        raise ValueError(f"{name} has shape {(<object>a).shape}; BLAS takes dimensions below 2**31")
    return <int>n


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
    _blas()
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray Wa = _in2(W, tn, "W")
    cdef int N = _blas_dim(xa, 0, "x"), D = _blas_dim(xa, 1, "x"), M = _blas_dim(Wa, 1, "W")
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
    _blas()
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray Wa = _in2(W, tn, "W")
    cdef cnp.ndarray da = _in2(dout, tn, "dout")
    cdef int N = _blas_dim(xa, 0, "x"), D = _blas_dim(xa, 1, "x"), M = _blas_dim(Wa, 1, "W")
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
    cdef cnp.ndarray ta = _labels(t, N, C)
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
    cdef cnp.ndarray ta = _labels(t, N, C)
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
    cdef cnp.ndarray ta = _labels(t, N, C)
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


cdef double _top_rows(real* h, long long* T, long long* idx, real* W2, real* b2, int act,
                      real* s, real* dh, int n, int B, int H, int C) noexcept nogil:
    """Rows [0, n) of a batch of B, above the first layer: given their hidden activations
    h, s = softmax(h @ W2 + b2), then ds = (s - onehot(t)) / B in place of s, and
    dh = act'(ds @ W2.T).  Each row depends on its own inputs only, so blocks of rows
    may run on different threads.  Returns the sum of the rows' losses, in row order."""
    cdef Py_ssize_t i, j
    cdef long long t
    cdef double loss = 0
    cdef real rs = <real>(1.0 / B)
    _affine(h, W2, b2, s, n, H, C, 0)
    _softmax(s, s, n, C)
    for i in range(n):
        t = T[idx[i]]
        loss -= log(<double>(s[i * C + t] + <real>LOG_EPS))
        for j in range(C):
            s[i * C + j] = s[i * C + j] * rs
        s[i * C + t] = s[i * C + t] - rs
    # dh = ds @ W2.T (with the old W2), then the activation's derivative
    _gemm(False, True, n, H, C, <real>1, s, C, W2, C, <real>0, dh, H)
    if act == 1:
        _map_relu_backward(dh, h, dh, <Py_ssize_t>n * H)
    else:
        _map_sigmoid_backward(dh, h, dh, <Py_ssize_t>n * H)
    return loss


# ---------------------------------------------------------------- sparse first layer
# Rows of X as CSR (indptr int64, indices int32 sorted within each row, data uint8
# pixels or floats of the parameters' dtype).  The loops are in _sparse.h; here they are
# split between OpenMP threads: the forward by rows (about equal non-zeros each), the
# weight update by column ranges of W (each column updated by one thread, in row
# order, so the result does not depend on the thread count).
DEF MAX_THREADS = 64
# below this many non-zeros in a call, one thread: waking the others costs more
DEF PARALLEL_NNZ = 4096


cdef inline void _sp_forward(long long* indptr, int* indices, void* data, bint pix, real* lut,
                             long long row0, long long n, real* W, real* b, real* out, long long D,
                             long long H, long long HP, long long* bad) noexcept nogil:
    if real is float:
        fn_sparse_forward_f(indptr, indices, data, pix, lut, row0, n, W, b, out, D, H, HP, bad)
    else:
        fn_sparse_forward_d(indptr, indices, data, pix, lut, row0, n, W, b, out, D, H, HP, bad)


cdef inline void _sp_forward_cols(long long* indptr, int* indices, void* data, bint pix, real* lut,
                                  long long* rows, long long n, real* W, real* b, real* out, long long D,
                                  long long HP, int jlo, int jhi, long long* bad) noexcept nogil:
    if real is float:
        fn_sparse_forward_cols_f(indptr, indices, data, pix, lut, rows, n, W, b, out, D, HP, jlo, jhi, bad)
    else:
        fn_sparse_forward_cols_d(indptr, indices, data, pix, lut, rows, n, W, b, out, D, HP, jlo, jhi, bad)


cdef inline void _sp_scatter(long long* indptr, int* indices, void* data, bint pix, real* lut,
                             long long* rows, long long n, real* G, real* W, long long D, long long H,
                             long long HP, int jlo, int jhi, long long* bad) noexcept nogil:
    if real is float:
        fn_sparse_scatter_f(indptr, indices, data, pix, lut, rows, n, G, W, D, H, HP, jlo, jhi, bad)
    else:
        fn_sparse_scatter_d(indptr, indices, data, pix, lut, rows, n, G, W, D, H, HP, jlo, jhi, bad)


# the rows of a sparse step's batch above the first layer run as this many blocks (on as
# many threads when there are): a fixed number, so that the results do not depend on
# the number of threads
DEF TOP_BLOCKS = 2
# The first layer of a sparse step runs as this many blocks of W's rows (the pixels):
# block k owns the rows [D k / PIXEL_BLOCKS, D (k + 1) / PIXEL_BLOCKS), sums the batch's
# non-zeros in those columns in the forward (partial sums, added up in block order above)
# and updates those rows, on the same thread in both.  So each row of W stays in the
# cache of one core, written and read there only.  Split by rows of the batch in the
# forward and by pixels in the update, as before, every row of W written by one core
# was read by the other in the next forward and had to cross between their caches.
# Measured with 100 steps a call, old and new builds alternating in one process on this
# 2-core EPYC: 74-76 -> 68-70 us a step when the machine is quiet, 139-145 -> 93-101 us
# when it is not (the slow phases of this VM are the ones where that crossing costs
# most).  A balanced cut (pixel 406 of 784 for MNIST, 47% of the non-zeros below 392)
# measured no faster than D / 2.  A fixed number, so that no sum depends on the number
# of threads; the sparse step uses at most this many.
DEF PIXEL_BLOCKS = 2


cdef struct _Padded:
    # scratch for the padded layout of _sparse.h (one block from fn_scratch_take):
    # W (D x HP), b (HP), G (B x HP) and, for gradients, dW (D x HP)
    void* block
    void* W
    void* b
    void* G
    void* dW
    long long HP
    void* fwd   # a step's forward sums over each block of pixels, PIXEL_BLOCKS x (B x HP)
    void* wp    # with vtop: W2 as H rows of one vector, W2.T as C rows of HP, and each top
    void* wt    # block's H x L scratch (fn_top_block in _top.h); else NULL
    void* acc
    void* part  # a step's sums over each block of rows above the first layer (_sp_step_par)


cdef int _padded_take(_Padded* s, void* W, long long D, long long H, long long B, bint grads,
                      long long tsize, long long C=0) except -1:
    """Take the scratch and copy W (D x H) into it in its layout (_w_rows_par: rows of HP
    for a step, split where H allows it otherwise, see fn_w_main in _sparse.h); b and G
    start at zero (their padding lanes must read 0; W's are zeroed by fn_w_rows).  With
    C (a step), room for its PIXEL_BLOCKS forward sums and TOP_BLOCKS partial sums too, and for
    fn_top_block's copies of W2 and scratch when the sizes fit it (s.wp NULL otherwise;
    fill them with _top_weights).  Give it back with fn_scratch_give(s.block)."""
    cdef long long HP = fn_padded(H, tsize)
    # W in the split layout for the forward over consecutive rows (no step: C == 0), see
    # fn_w_main in _sparse.h; the step's loops read the plain padded rows
    cdef size_t w = fn_w_bytes(D, H, tsize, C == 0), g = <size_t>(B * HP * tsize)
    cdef size_t bb = <size_t>(HP * tsize), total = w + bb + g + (w if grads else 0)
    cdef size_t fwd = <size_t>(PIXEL_BLOCKS * g) if C else 0
    cdef bint vtop = C and (fn_top_fits_f(H, C) if tsize == 4 else fn_top_fits_d(H, C))
    if C and not vtop:
        _blas()  # the rows above the first layer go through BLAS (_top_rows_blas)
    cdef size_t wp = <size_t>(H * 64) if vtop else 0, wt = <size_t>(C * HP * tsize) if vtop else 0
    cdef size_t acc = <size_t>(TOP_BLOCKS * H * 64) if vtop else 0
    cdef size_t parts = <size_t>(TOP_BLOCKS * (C + H + H * C) * tsize) if C else 0
    # the areas one after the other, each a whole number of 64-byte lines but the last
    cdef size_t o_wp = total + fwd, o_wt = o_wp + wp, o_acc = o_wt + wt, o_part = o_acc + acc
    s.block = fn_scratch_take(o_part + parts)
    if s.block == NULL:
        raise MemoryError(f"no memory for the {o_part + parts} bytes of padded weights")
    with nogil:
        _w_rows_par(W, D, H, s.block, tsize, C == 0, False)
    memset(<char*>s.block + w, 0, bb + g)
    s.HP = HP
    s.W = s.block
    s.b = <char*>s.block + w
    s.G = <char*>s.block + w + bb
    s.dW = (<char*>s.block + w + bb + g) if grads else NULL
    s.fwd = (<char*>s.block + total) if C else NULL
    s.wp = (<char*>s.block + o_wp) if vtop else NULL
    s.wt = (<char*>s.block + o_wt) if vtop else NULL
    s.acc = (<char*>s.block + o_acc) if vtop else NULL
    s.part = (<char*>s.block + o_part) if C else NULL
    return 0


cdef inline void _pixel_table(real* lut) noexcept nogil:
    """lut[u] = u / 255 in the working dtype, as load_mnist(normalize=True) computes it."""
    cdef int u
    for u in range(256):
        lut[u] = (<real>u) / <real>255


cdef int _split_rows(long long* indptr, long long row0, long long n, long long* cut) noexcept nogil:
    """Cut rows row0 + [0, n) into up to fn_max_threads() runs of about equal non-zeros:
    run t is [cut[t], cut[t + 1]).  Returns the number of runs (1 for small work)."""
    cdef long long i, total = indptr[row0 + n] - indptr[row0], acc = 0
    cdef int t, nt = fn_max_threads()
    if nt > MAX_THREADS:
        nt = MAX_THREADS
    if nt > n:
        nt = <int>n
    if nt < 1 or total < PARALLEL_NNZ:
        nt = 1
    cut[0] = 0
    t = 1
    for i in range(n):
        while t < nt and acc * nt >= total * t:
            cut[t] = i
            t += 1
        acc += indptr[row0 + i + 1] - indptr[row0 + i]
    while t <= nt:
        cut[t] = n
        t += 1
    return nt


cdef inline void _sp_forward_run(long long* indptr, int* indices, void* data, bint pix, real* lut,
                                 long long row0, real* W, real* b, real* out, long long D, long long H,
                                 long long HP, int act, long long* cut, int t, long long* bad) noexcept nogil:
    """Run t of the rows (cut[t]:cut[t + 1], from _split_rows): out = act(X[row0 + i] @ W + b)
    (W and b padded, out not); the thread's count of bad columns in bad[0]."""
    cdef long long c0 = cut[t], n = cut[t + 1] - cut[t]
    cdef real* o = out + c0 * H
    bad[0] = 0
    _sp_forward(indptr, indices, data, pix, lut, row0 + c0, n, W, b, o, D, H, HP, bad)
    if act == 1:
        _map_relu(o, o, n * H)
    elif act == 2:
        _map_sigmoid(o, o, n * H)


cdef void _sp_forward_par(long long* indptr, int* indices, void* data, bint pix, real* lut,
                          long long row0, real* W, real* b, real* out, long long D, long long H,
                          long long HP, int act, long long* cut, int nt, long long* bad) noexcept nogil:
    """out = act(X[row0 + i] @ W + b), run t of the rows on thread t (_sp_forward_run)."""
    cdef long long bads[MAX_THREADS]
    cdef int t
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        _sp_forward_run(indptr, indices, data, pix, lut, row0, W, b, out, D, H, HP, act, cut, t, &bads[t])
    for t in range(nt):
        bad[0] += bads[t]


cdef inline void _block_sums(real* h, real* ds, real* dh, int n, int H, int C, real* part) noexcept nogil:
    """The sums over n rows of one block: part = [db2 (C), db1 (H), dW2 = h.T @ ds (H x C)]."""
    cdef Py_ssize_t i, j
    for j in range(C + H):
        part[j] = 0
    for i in range(n):
        for j in range(C):
            part[j] += ds[i * C + j]
    for i in range(n):
        for j in range(H):
            part[C + j] += dh[i * H + j]
    _gemm(True, False, H, C, n, <real>1, h, H, ds, C, <real>0, part + C + H, C)


cdef void _sum_blocks(real* part, int nb, double lr, real* W2, real* b2, real* b1, real* dW2, real* db2,
                      real* db1, int H, int C) noexcept nogil:
    """db2, db1 and dW2 as the sums of the blocks' parts (in block order); with lr != 0
    SGD on W2, b2 and b1 from them, else written to dW2, db2 and db1."""
    cdef Py_ssize_t j, k
    cdef long long w = C + H + H * C
    cdef real v
    for j in range(C + H + H * C):
        v = part[j]
        for k in range(1, nb):
            v = v + part[k * w + j]
        if j < C:
            db2[j] = v
            if lr != 0:
                b2[j] -= <real>lr * v
        elif j < C + H:
            db1[j - C] = v
            if lr != 0:
                b1[j - C] -= <real>lr * v
        elif lr != 0:
            W2[j - C - H] -= <real>lr * v
        else:
            dW2[j - C - H] = v


cdef inline void _top_weights(real* W2, long long H, long long C, long long HP, real* wp,
                              real* wt) noexcept nogil:
    if real is float:
        fn_top_weights_f(W2, H, C, HP, wp, wt)
    else:
        fn_top_weights_d(W2, H, C, HP, wp, wt)


cdef double _top_rows_blas(real* fwd, long long q, long long r0, long long r1, real* h, long long* T,
                           long long* idx, real* W2, real* b2, int act, real* s, real* dh, real* G,
                           real mlr, int B, long long H, long long HP, int C, real* part) noexcept nogil:
    """Rows r0:r1 of a sparse step above the first layer with BLAS (the sizes fn_top_block
    does not take): h = act(sum of the PIXEL_BLOCKS forward sums), _top_rows, the rows'
    G = mlr * dh (padded) and their sums (_block_sums) into part.  Returns their loss."""
    cdef Py_ssize_t i, j
    cdef double loss
    if real is float:
        fn_sum_parts_f(fwd + r0 * HP, q, PIXEL_BLOCKS, r1 - r0, H, HP, h + r0 * H)
    else:
        fn_sum_parts_d(fwd + r0 * HP, q, PIXEL_BLOCKS, r1 - r0, H, HP, h + r0 * H)
    if act == 1:
        _map_relu(h + r0 * H, h + r0 * H, (r1 - r0) * H)
    elif act == 2:
        _map_sigmoid(h + r0 * H, h + r0 * H, (r1 - r0) * H)
    loss = _top_rows(h + r0 * H, T, idx + r0, W2, b2, act, s + r0 * C, dh + r0 * H, <int>(r1 - r0), B,
                     <int>H, C)
    for i in range(r0, r1):
        for j in range(H):
            G[i * HP + j] = dh[i * H + j] * mlr
    _block_sums(h + r0 * H, s + r0 * C, dh + r0 * H, <int>(r1 - r0), <int>H, C, part)
    return loss


cdef double _sp_step_par(long long* indptr, int* indices, void* data, bint pix, real* lut,
                         long long* idx, real* W, real* b, real* h, long long D, long long H,
                         long long HP, int act, int nt, long long* bad,
                         long long* T, real* W2, real* b2, real* s, real* dh, real* G,
                         real mlr, int B, int C, double lr, real* b1, real* db1, real* dW2,
                         real* db2, real* Wt, real* out, real* fwd, real* part, real* wp, real* wt,
                         real* acc) noexcept nogil:
    """A whole sparse step in one parallel region, on up to PIXEL_BLOCKS threads.  First
    by blocks of pixels (the rows of W): block k sums the batch's non-zeros in its
    columns into fwd[k] (B x HP; b in block 0's).  Then by TOP_BLOCKS blocks of rows:
    h = act(fwd[0] + fwd[1] + ...), softmax-with-loss and the backward to the block's
    rows of G = mlr * dh (padded) and its sums, in vectors (fn_top_block, with W2's
    copies wp and wt) when wp is not NULL, else with BLAS (_top_rows, _block_sums).
    Then by blocks of pixels again, block k on the thread that did its forward:
    W += X[idx].T @ G scattered over its rows of W, each in image order (or with ``out``
    the gradient: its rows of Wt zeroed first, then copied unpadded into out); block 0
    first adds up the blocks' sums, updates W2, b2 and b1 (_sum_blocks) and W2's copies.
    No sum depends on the number of threads.  Returns the sum of the rows' losses (block
    sums added in block order)."""
    cdef long long bads[PIXEL_BLOCKS]
    cdef long long sbad[PIXEL_BLOCKS]
    cdef double losses[TOP_BLOCKS]
    cdef int k, nb = TOP_BLOCKS if B >= TOP_BLOCKS else B
    cdef long long r0, r1, w = C + H + H * C, q = <long long>B * HP
    cdef int jlo, jhi
    cdef double loss = 0
    cdef int tid, nthr
    with parallel(num_threads=nt):
        # blocks go to threads by hand (block k on thread k mod nthr, in every phase) with a
        # barrier between the phases: see fn_barrier in _sparse.h for why not prange
        tid = threadid()
        nthr = fn_num_threads()
        k = tid
        while k < PIXEL_BLOCKS:
            bads[k] = 0
            _sp_forward_cols(indptr, indices, data, pix, lut, idx, B, W, b if k == 0 else <real*>NULL,
                             fwd + k * q, D, HP, <int>(D * k // PIXEL_BLOCKS), <int>(D * (k + 1) // PIXEL_BLOCKS),
                             &bads[k])
            k = k + nthr
        fn_barrier()  # the blocks of rows read every block's forward sums
        k = tid
        while k < nb:
            r0 = B * k // nb
            r1 = B * (k + 1) // nb
            if wp != NULL:
                if real is float:
                    losses[k] = fn_top_block_f(fwd + r0 * HP, q, PIXEL_BLOCKS, r1 - r0, H, HP, act, wp, wt,
                                               b2, T, idx + r0, C, B, mlr, G + r0 * HP, part + k * w,
                                               acc + k * H * (64 // sizeof(real)))
                else:
                    losses[k] = fn_top_block_d(fwd + r0 * HP, q, PIXEL_BLOCKS, r1 - r0, H, HP, act, wp, wt,
                                               b2, T, idx + r0, C, B, mlr, G + r0 * HP, part + k * w,
                                               acc + k * H * (64 // sizeof(real)))
            else:
                losses[k] = _top_rows_blas(fwd, q, r0, r1, h, T, idx, W2, b2, act, s, dh, G, mlr, B, H, HP, C,
                                           part + k * w)
            k = k + nthr
        fn_barrier()  # the update reads every block's rows of G, and block 0 their sums
        k = tid
        while k < PIXEL_BLOCKS:
            if k == 0:
                _sum_blocks(part, nb, lr, W2, b2, b1, dW2, db2, db1, <int>H, C)
                if wp != NULL and lr != 0:
                    _top_weights(W2, H, C, HP, wp, wt)
            sbad[k] = 0
            jlo = <int>(D * k // PIXEL_BLOCKS)
            jhi = <int>(D * (k + 1) // PIXEL_BLOCKS)
            if out != NULL:
                memset(Wt + jlo * HP, 0, (jhi - jlo) * HP * sizeof(real))
            _sp_scatter(indptr, indices, data, pix, lut, idx, B, G, Wt, D, H, HP, jlo, jhi, &sbad[k])
            if out != NULL:
                fn_unpad_rows(Wt + jlo * HP, jhi - jlo, HP, out + jlo * H, H, sizeof(real))
            k = k + nthr
    for k in range(PIXEL_BLOCKS):
        bad[0] += bads[k] + sbad[k]
    for k in range(nb):
        loss += losses[k]
    return loss


cdef void _w_rows_par(void* W, long long D, long long H, void* Wl, long long tsize, bint split,
                      bint back) noexcept nogil:
    """W (D x H, dense) into Wl, W's layout in the scratch (fn_w_rows: padded rows, or
    split when ``split`` and H allow it), or back when ``back``, with the rows split
    between threads (a call of a single step does it once at the start and once at the
    end)."""
    cdef int t, nt = fn_max_threads()
    cdef long long r0, r1
    if nt > MAX_THREADS:
        nt = MAX_THREADS
    if D * H * tsize < 65536:
        nt = 1
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        r0 = D * t // nt
        r1 = D * (t + 1) // nt
        fn_w_rows(W, D, H, Wl, r0, r1, tsize, split, back)


cdef double _two_layer_sgd_step(long long* indptr, int* indices, void* data, bint pix,
                               real* lut, long long* T, long long* idx, _Padded* pad, real* b1,
                               real* W2, real* b2, double lr, int act, real* h, real* s, real* dh,
                               real* db1, real* dW2, real* db2, int B, int D, int H, int C,
                               long long* bad) noexcept nogil:
    """One SGD step of the two-layer net with the first layer over CSR rows and W1 in the
    padded layout (pad.W), in one parallel region (_sp_step_par): the forward by blocks
    of pixels, the layers above by blocks of rows, then the W1 update scattered by the
    same blocks of pixels.  One thread when the batch has fewer than PARALLEL_NNZ
    non-zeros.  ``lut``: the pixel table (_pixel_table).  Returns the batch loss."""
    cdef long long HP = pad.HP, total = 0
    cdef int i, nt = fn_max_threads()
    cdef real* Wp = <real*>pad.W
    memcpy(pad.b, b1, H * sizeof(real))
    for i in range(B):
        total += indptr[idx[i] + 1] - indptr[idx[i]]
    if nt > PIXEL_BLOCKS:
        nt = PIXEL_BLOCKS
    if nt < 1 or total < PARALLEL_NNZ:
        nt = 1
    return _sp_step_par(indptr, indices, data, pix, lut, idx, Wp, <real*>pad.b, h, D, H, HP, act,
                        nt, bad, T, W2, b2, s, dh, <real*>pad.G, <real>(-lr), B, C, lr, b1, db1, dW2, db2,
                        Wp, NULL, <real*>pad.fwd, <real*>pad.part, <real*>pad.wp, <real*>pad.wt,
                        <real*>pad.acc) / B


cdef object _csr(indptr, indices, data, int tn, str who):
    """Check CSR arrays; returns whether data holds uint8 pixels."""
    for name, a, typenum in (("indptr", indptr, cnp.NPY_INT64), ("indices", indices, cnp.NPY_INT32)):
        if not (cnp.PyArray_Check(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
                and cnp.PyArray_NDIM(<cnp.ndarray>a) == 1 and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)):
            raise TypeError(f"{who}: {name} must be a C-contiguous 1-D "
                            f"{'int64' if typenum == cnp.NPY_INT64 else 'int32'} array")
    if not (cnp.PyArray_Check(data) and cnp.PyArray_NDIM(<cnp.ndarray>data) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>data)):
        raise TypeError(f"{who}: data must be a C-contiguous 1-D array")
    cdef int dn = cnp.PyArray_TYPE(<cnp.ndarray>data)
    if dn != cnp.NPY_UINT8 and dn != tn:
        raise TypeError(f"{who}: data is {data.dtype}; it must be uint8 pixels or the weights' "
                        f"dtype {np.dtype(np.float32 if tn == cnp.NPY_FLOAT32 else np.float64)}")
    if indptr.shape[0] < 1:
        raise ValueError(f"{who}: indptr must hold at least one entry")
    if data.shape[0] != indices.shape[0]:
        raise ValueError(f"{who}: data has {data.shape[0]} entries but indices {indices.shape[0]}")
    return dn == cnp.NPY_UINT8


cdef int _csr_rows_ok(long long* indptr, long long n_rows, long long nnz, long long* rows,
                      long long row0, long long n) except -1:
    """The rows used must have 0 <= indptr[r] <= indptr[r + 1] <= nnz."""
    cdef long long i, r
    for i in range(n):
        r = rows[i] if rows != NULL else row0 + i
        if r < 0 or r >= n_rows:
            raise IndexError(f"row {r} is out of range for {n_rows} rows")
        if indptr[r] < 0 or indptr[r] > indptr[r + 1] or indptr[r + 1] > nnz:
            raise ValueError(f"indptr is not a valid CSR row pointer at row {r}")
    return 0


cdef int _two_layer_sgd_sparse(indptr, indices, data, T, idx, theta, long long D, long long H, long long C,
                               double lr, int act, losses) except -1:
    """train_steps_mlp_sparse for a net of two layers with plain SGD and no weight decay,
    the arguments checked by _checks.mlp_steps: the step of _sp_step_par, whose layers
    above the first run in vectors by blocks of rows inside the same parallel region
    (fn_top_block in _top.h).  The book's run: 60 us a step against 70 us for the
    general engine on this machine (benchmarks/README.md).  Stops after a step that met
    a bad column index or whose loss is not finite; returns the number of steps run."""
    cdef long long* pp = <long long*>_p(indptr)
    cdef int* pj = <int*>_p(indices)
    cdef void* pd = _p(data)
    cdef bint pixels = data.dtype == np.uint8, f32 = theta.dtype == np.float32
    cdef long long* pT = <long long*>_p(T)
    cdef long long* pidx = <long long*>_p(idx)
    cdef double* pl = <double*>_p(losses)
    cdef int S = idx.shape[0], B = idx.shape[1], k, done = 0
    cdef long long bad = 0, ts = theta.dtype.itemsize
    # theta: W1 (D x H), b1, W2 (H x C), b2; scratch: h, s, dh (B rows), db1, dW2, db2
    cdef char* pw = <char*>_p(theta)
    cdef void* W1 = pw
    cdef void* b1 = pw + D * H * ts
    cdef void* W2 = pw + (D * H + H) * ts
    cdef void* b2 = pw + (D * H + H + H * C) * ts
    work = np.empty(B * (H + C + H) + H + H * C + C, theta.dtype)
    cdef char* pk = <char*>_p(work)
    cdef void* h = pk
    cdef void* s = pk + B * H * ts
    cdef void* dh = pk + B * (H + C) * ts
    cdef void* db1 = pk + B * (H + C + H) * ts
    cdef void* dW2 = pk + (B * (H + C + H) + H) * ts
    cdef void* db2 = pk + (B * (H + C + H) + H + H * C) * ts
    cdef double loss
    cdef long long* rows
    cdef _Padded pad
    cdef float lutf[256]
    cdef double lutd[256]
    _padded_take(&pad, W1, D, H, B, False, ts, C)
    with nogil:
        if f32:
            _pixel_table(lutf)
            if pad.wp != NULL:
                _top_weights(<float*>W2, H, C, pad.HP, <float*>pad.wp, <float*>pad.wt)
        else:
            _pixel_table(lutd)
            if pad.wp != NULL:
                _top_weights(<double*>W2, H, C, pad.HP, <double*>pad.wp, <double*>pad.wt)
        for k in range(S):
            rows = pidx + <Py_ssize_t>k * B
            if f32:
                loss = _two_layer_sgd_step(pp, pj, pd, pixels, lutf, pT, rows, &pad, <float*>b1, <float*>W2,
                                           <float*>b2, lr, act, <float*>h, <float*>s, <float*>dh, <float*>db1,
                                           <float*>dW2, <float*>db2, B, <int>D, <int>H, <int>C, &bad)
            else:
                loss = _two_layer_sgd_step(pp, pj, pd, pixels, lutd, pT, rows, &pad, <double*>b1, <double*>W2,
                                           <double*>b2, lr, act, <double*>h, <double*>s, <double*>dh,
                                           <double*>db1, <double*>dW2, <double*>db2, B, <int>D, <int>H, <int>C,
                                           &bad)
            pl[k] = loss
            done += 1
            if bad or not (loss - loss == 0):  # a bad column, NaN or inf: stop here
                break
        _w_rows_par(W1, D, H, pad.W, ts, False, True)
        fn_scratch_give(pad.block)
    if bad:
        raise ValueError(f"train_steps_mlp_sparse: {bad} column indices are outside [0, {D}) "
                         "(the weights may be partly updated)")
    return done


cdef tuple _first_layer_args(str who, indptr, indices, data, W, b, int act, str wname, str bname):
    """The checks of a kernel whose first layer reads CSR rows: act, the CSR arrays, W and
    b.  Returns (dtype number, whether data holds uint8 pixels, W, b) as contiguous arrays."""
    if act < 0 or act > 2:
        raise ValueError(f"act must be 0 (identity), 1 (relu) or 2 (sigmoid), got {act}")
    cdef int tn = _typenum(W, wname)
    pixels = _csr(indptr, indices, data, tn, who)
    cdef cnp.ndarray Wa = _in2(W, tn, wname)
    return tn, pixels, Wa, _vec(b, tn, bname, Wa.shape[1], False)


cdef long long* _row_range(indptr, indices, long long row0, long long n) except NULL:
    """indptr's pointer, after checking that rows [row0, row0 + n) exist and are valid."""
    cdef cnp.ndarray pa = <cnp.ndarray>indptr
    cdef long long* pp = <long long*>_p(pa)
    if row0 < 0 or row0 + n > pa.shape[0] - 1:
        raise IndexError(f"rows [{row0}, {row0 + n}) are out of range for {pa.shape[0] - 1} rows")
    _csr_rows_ok(pp, pa.shape[0] - 1, indices.shape[0], NULL, row0, n)
    return pp


def sparse_affine(indptr, indices, data, long long row0, W, b, int act, out):
    cdef int tn
    cdef bint pixels
    cdef cnp.ndarray Wa, ba
    tn, pixels, Wa, ba = _first_layer_args("sparse_affine", indptr, indices, data, W, b, act, "W", "b")
    cdef long long D = Wa.shape[0], H = Wa.shape[1]
    cdef cnp.ndarray oa = _out2(out, tn, "out", out.shape[0] if out.ndim == 2 else -1, H)
    cdef long long n = oa.shape[0]
    cdef long long* pp = _row_range(indptr, indices, row0, n)
    cdef long long bad = 0
    cdef int* pj = <int*>_p(<cnp.ndarray>indices)
    cdef void* pd = _p(<cnp.ndarray>data)
    cdef void* po = _p(oa)
    cdef float lutf[256]
    cdef double lutd[256]
    cdef long long cut[MAX_THREADS + 1]
    cdef int nt
    cdef _Padded pad
    cdef long long ts = 4 if tn == cnp.NPY_FLOAT32 else 8
    _padded_take(&pad, _p(Wa), D, H, 0, False, ts)
    memcpy(pad.b, _p(ba), H * ts)
    with nogil:
        nt = _split_rows(pp, row0, n, cut)
        if tn == cnp.NPY_FLOAT32:
            _pixel_table(lutf)
            _sp_forward_par(pp, pj, pd, pixels, lutf, row0, <float*>pad.W, <float*>pad.b,
                            <float*>po, D, H, pad.HP, act, cut, nt, &bad)
        else:
            _pixel_table(lutd)
            _sp_forward_par(pp, pj, pd, pixels, lutd, row0, <double*>pad.W, <double*>pad.b,
                            <double*>po, D, H, pad.HP, act, cut, nt, &bad)
        fn_scratch_give(pad.block)
    if bad:
        raise ValueError(f"sparse_affine: {bad} column indices are outside [0, {D})")
    return out


def sparse_rows(X):
    """CSR of the rows of a dense 2-D array: (indptr int64, indices int32, data)."""
    if not cnp.PyArray_Check(X):
        raise TypeError(f"X must be a numpy array, got {type(X).__name__}")
    cdef cnp.ndarray Xa = np.ascontiguousarray(X)
    cdef int xn = cnp.PyArray_TYPE(Xa)
    if xn != cnp.NPY_UINT8 and xn != cnp.NPY_FLOAT32 and xn != cnp.NPY_FLOAT64:
        raise TypeError(f"X must be uint8, float32 or float64, got {X.dtype}")
    if cnp.PyArray_NDIM(Xa) != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    cdef Py_ssize_t N = Xa.shape[0], D = Xa.shape[1]
    if D >= 2 ** 31:
        raise ValueError(f"X has {D} columns; column indices are int32")
    cdef cnp.ndarray indptr = np.empty(N + 1, np.int64)
    cdef long long* pp = <long long*>_p(indptr)
    cdef void* px = _p(Xa)
    cdef Py_ssize_t r
    pp[0] = 0
    with nogil:
        for r in prange(N, schedule="static"):
            if xn == cnp.NPY_UINT8:
                pp[r + 1] = _count_nonzero(<unsigned char*>px + r * D, D)
            elif xn == cnp.NPY_FLOAT32:
                pp[r + 1] = _count_nonzero(<float*>px + r * D, D)
            else:
                pp[r + 1] = _count_nonzero(<double*>px + r * D, D)
        for r in range(N):
            pp[r + 1] += pp[r]
    cdef cnp.ndarray indices = np.empty(pp[N], np.int32)
    cdef cnp.ndarray data = np.empty(pp[N], X.dtype)
    cdef int* pj = <int*>_p(indices)
    cdef void* pd = _p(data)
    with nogil:
        for r in prange(N, schedule="static"):
            if xn == cnp.NPY_UINT8:
                _fill_row(<unsigned char*>px + r * D, D, pj + pp[r], <unsigned char*>pd + pp[r],
                          pp[r + 1] - pp[r])
            elif xn == cnp.NPY_FLOAT32:
                _fill_row(<float*>px + r * D, D, pj + pp[r], <float*>pd + pp[r], pp[r + 1] - pp[r])
            else:
                _fill_row(<double*>px + r * D, D, pj + pp[r], <double*>pd + pp[r], pp[r + 1] - pp[r])
    return indptr, indices, data


ctypedef unsigned char uchar

ctypedef fused cell:
    uchar
    float
    double


cdef long long _count_nonzero(cell* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    cdef long long c = 0
    for j in range(n):
        c += x[j] != 0
    return c


cdef void _fill_row(cell* x, Py_ssize_t n, int* indices, cell* data, long long count) noexcept nogil:
    """The ``count`` non-zeros of x[:n] into indices/data, without a branch on each value
    (a fifth of MNIST's pixels are non-zero, in no pattern a predictor can learn): every
    column is written at the next free place, which moves on past non-zeros only; the
    places are all within the row's ``count`` until the last non-zero is in."""
    cdef Py_ssize_t j = 0, k
    cdef long long q = 0
    cdef unsigned long long word
    if cell is uchar:
        # pixels: eight at a time where all eight are zero (the borders of a digit)
        while j + 8 <= n and q < count:
            memcpy(&word, x + j, 8)
            if word != 0:
                for k in range(j, j + 8):
                    if q == count:
                        break
                    indices[q] = <int>k
                    data[q] = x[k]
                    q += x[k] != 0
            j += 8
    while j < n:
        if q == count:
            break
        indices[q] = <int>j
        data[q] = x[j]
        q += x[j] != 0
        j += 1


include "_mlp.pxi"
