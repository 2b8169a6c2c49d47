# Argument checks of the elementary kernels (included by _cython.pyx): dtypes, shapes and
# contiguity, checked once per call before the GIL is released.  Labels, activation
# codes and the MLP engine's arguments are checked in Python by _checks.py, for all
# three backends.

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


cdef int _blas_dim(cnp.ndarray a, int axis, str name) except -1:
    """Dimension ``axis`` of ``a`` as the C int that BLAS takes (refused when larger)."""
    cdef Py_ssize_t n = a.shape[axis]
    if n > INT_MAX:
        raise ValueError(f"{name} has shape {(<object>a).shape}; BLAS takes dimensions below 2**31")
    return <int>n


cdef inline void* _p(cnp.ndarray a) noexcept:
    return cnp.PyArray_DATA(a)
