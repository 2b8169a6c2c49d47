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
from libc.math cimport INFINITY, NAN, fabs, log, pow, sqrt
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
    void fn_prefetch_bytes(const void* p, long long n)
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
    # vectorisable exp and sigmoid, in place, and the CPU's vector width (see _vmath.h)
    int fn_wide_vectors()
    int fn_narrow_only
    double fn_exp(double x)
    void fn_exp_inplace_d(double* y, Py_ssize_t n)
    void fn_exp_inplace_f(float* y, Py_ssize_t n)
    void fn_sigmoid_inplace_d(double* y, Py_ssize_t n)
    void fn_sigmoid_inplace_f(float* y, Py_ssize_t n)

import numpy as np
from importlib.util import find_spec as importlib_find_spec

from . import _blas as _blas_lib
from . import _checks as _chk
from . import _scratch
from ._checks import activation
from ._checks import labels as _checked_labels
from ._checks import threads as _threads

cnp.import_array()

NAME = "cython"

#: whether this CPU has AVX-512's 64-byte registers: the sparse loops then run in 64-byte
#: vectors, else in 32-byte ones, and the layers above a sparse two-layer step's first
#: run in vectors (_top.h), else through BLAS
WIDE_VECTORS = bool(fn_wide_vectors())


def _narrow_vectors(bint on):
    """With ``on``, the kernels take the builds of a CPU without AVX-512 on every CPU (so
    that the tests run them on one with it); returns the setting before."""
    global WIDE_VECTORS, fn_narrow_only
    before = bool(fn_narrow_only)
    fn_narrow_only = on
    WIDE_VECTORS = bool(fn_wide_vectors())
    return before


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


# contract.Act, contract.Opt and the fields of the opt record (tests/test_mlp_engine.py
# checks them against contract.py through _codes())
cdef enum:
    ACT_IDENTITY = 0
    ACT_RELU = 1
    ACT_SIGMOID = 2
    OPT_SGD = 1
    OPT_MOMENTUM = 2
    OPT_ADAGRAD = 3
    OPT_ADAM = 4
    OPT_KIND = 0
    OPT_LR = 1
    OPT_BETA1 = 2
    OPT_BETA2 = 3
    OPT_DECAY = 4
    OPT_ITER = 5


def _codes():
    """The codes compiled into this module, as contract.py names them."""
    return {"Act": {"IDENTITY": ACT_IDENTITY, "RELU": ACT_RELU, "SIGMOID": ACT_SIGMOID},
            "Opt": {"SGD": OPT_SGD, "MOMENTUM": OPT_MOMENTUM, "ADAGRAD": OPT_ADAGRAD, "ADAM": OPT_ADAM},
            "fields": [OPT_KIND, OPT_LR, OPT_BETA1, OPT_BETA2, OPT_DECAY, OPT_ITER]}


# One file per concern, included in this order (one extension module: they share the
# fused type ``real``, the C declarations above and the BLAS pointers).
include "_blas.pxi"
include "_args.pxi"
include "_dense.pxi"
include "_sparse.pxi"
include "_csr.pxi"
include "_mlp.pxi"
include "_numgrad.pxi"
