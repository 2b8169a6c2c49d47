# BLAS for the Cython kernels (included by _cython.pyx): sgemm and dgemm from SciPy's
# cython_blas, loaded on the first kernel call that needs them, the row-major _gemm on
# top, and the per-thread BLAS thread setting the sparse kernels use.

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
    with _blas_lib.spin_briefly():
        capi = _cython_blas().__pyx_capi__
    dgemm = <_dgemm_t>PyCapsule_GetPointer(capi["dgemm"], PyCapsule_GetName(capi["dgemm"]))
    sgemm = <_sgemm_t>PyCapsule_GetPointer(capi["sgemm"], PyCapsule_GetName(capi["sgemm"]))
    cdef size_t address
    n_blas_libs = 0
    for address in _blas_lib.openblas_threads_local()[:MAX_BLAS_LIBS]:
        blas_threads_local[n_blas_libs] = <_threads_local_t>address
        n_blas_libs += 1
    return 0


cdef void _gemm_one_thread(bint ta, bint tb, int M, int N, int K, real alpha, real* A, int lda,
                           real* B, int ldb, real beta, real* C, int ldc) noexcept nogil:
    """_gemm with BLAS held to the calling thread (an OpenMP thread of a step or of an
    evaluation)."""
    cdef int had[MAX_BLAS_LIBS]
    _blas_one_thread(had)
    _gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
    _blas_threads_back(had)


cdef extern from "_gemm256.h" nogil:
    void fn_gemm_256(long long M, long long N, long long K, float alpha, const float* A, long long si,
                     long long sp, const float* B, long long ldb, float beta, float* C, long long ldc)
    int fn_gemm_256_ready()

cdef bint _gemm_256_ready = fn_gemm_256_ready()
cdef bint _gemm_256_off = False  # every product to BLAS (_blas_products)
# the most elements of B that fn_gemm_256 takes: each block of 6 rows of C reads all of
# B, which must stay in L2; larger, BLAS's blocked copies are the faster way
# (benchmarks/README.md, "the layers above the first without BLAS's copies")
DEF GEMM_256_MOST = 32768


def _blas_products(bint on):
    """Every product of the Cython kernels through BLAS (on), or fn_gemm_256 where
    _own_gemm says (off: the default); returns the setting before.  For the tests and
    the benchmarks (both ways in one process)."""
    global _gemm_256_off
    before = _gemm_256_off
    _gemm_256_off = on
    return before


cdef inline bint _own_gemm(int K, int N) noexcept nogil:
    """Whether _gemm_here multiplies float32 blocks by a K x N matrix B (not transposed)
    with fn_gemm_256: on a CPU with AVX2 and FMA but not the wider vectors of AVX-512,
    where BLAS's own kernels are the faster ones (such a CPU takes it in the tests through
    _cython._narrow_vectors), and where B fits in L2 (each block of 6 rows reads all of it)."""
    return _gemm_256_ready and not _gemm_256_off and K * <long long>N <= GEMM_256_MOST and not fn_wide_vectors()


cdef void _gemm_here(bint one_thread, bint ta, bint tb, int M, int N, int K, real alpha, real* A, int lda,
                     real* B, int ldb, real beta, real* C, int ldc) noexcept nogil:
    """_gemm on the calling thread: fn_gemm_256 where _own_gemm says, else BLAS (held to
    this thread for the call when one_thread; else as the caller has set it)."""
    if real is float:
        if not tb and _own_gemm(K, N):
            fn_gemm_256(M, N, K, alpha, A, 1 if ta else lda, lda if ta else 1, B, ldb, beta, C, ldc)
            return
    if one_thread:
        _gemm_one_thread(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
    else:
        _gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)


cdef void _blas_one_thread(int* had) noexcept nogil:
    """Let BLAS calls from this thread use one thread; had[i] receives what library i had
    (MAX_BLAS_LIBS entries).  The steps and the evaluations call BLAS from their
    OpenMP threads, each with a block of the work: BLAS's own threads would wait on
    OpenMP's, which keep their cores busy, for many times the work (benchmarks/README.md).
    OpenBLAS keeps this setting for the whole process, not the thread, so two threads
    that each set and restore it can leave the other's value behind: a kernel whose
    threads call _gemm_one_thread sets 1 on the calling thread around its region, so
    that every pair inside it restores 1."""
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
