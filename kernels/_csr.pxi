# Building CSR rows from dense arrays (included by _cython.pyx): the kernel sparse_rows.

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
