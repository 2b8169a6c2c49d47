"""Argument checks shared by the Python-side wrappers of the compiled backends.

The reference backend needs none (NumPy raises on its own); the Cython backend does
the same checks in C.  Each check names the argument and both shapes or dtypes.
"""

from __future__ import annotations

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def dtype_of(a, name: str) -> np.dtype:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return a.dtype


def inp(a, dtype: np.dtype, name: str, ndim: int = 2):
    """Input ``a``: same dtype, right ndim, C-contiguous (copied only when strided)."""
    if type(a) is np.ndarray and a.dtype == dtype and a.ndim == ndim:  # the common case
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        raise TypeError(
            f"{name} is {getattr(a, 'dtype', type(a).__name__)} but the other arrays are "
            f"{dtype}; fastnet never mixes float32 and float64 in a kernel"
        )
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def out(a, dtype: np.dtype, name: str, shape: tuple):
    """Output ``a``: same dtype, exactly ``shape``, writeable and C-contiguous."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        raise TypeError(f"{name} is {getattr(a, 'dtype', type(a).__name__)}; expected {dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    if not (a.flags.c_contiguous and a.flags.writeable):
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return a


def same_shape(a, b, name_a: str, name_b: str):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def labels(t, rows: int):
    if not (type(t) is np.ndarray and t.dtype == np.int64 and t.flags.c_contiguous):
        t = np.ascontiguousarray(t, dtype=np.int64)
    if t.shape != (rows,):
        raise ValueError(f"labels have shape {t.shape}, expected ({rows},)")
    return t
