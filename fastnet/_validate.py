"""Input checks that turn user mistakes into errors a person can act on."""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_dtype(dtype) -> np.dtype:
    """``dtype`` as float32 or float64, or a ValueError naming what is allowed."""
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def as_float_array(x, name: str = "x", dtype=None) -> np.ndarray:
    """``x`` as a float ndarray (of ``dtype`` when given); clear TypeError otherwise.

    Integers and booleans are converted (to float64 unless ``dtype`` says otherwise),
    as NumPy does in the book's code; strings, objects and complex numbers are refused.
    """
    arr = np.asarray(x)
    kind = arr.dtype.kind
    if kind not in "fiub":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if dtype is None:
        dtype = arr.dtype if arr.dtype in FLOAT_DTYPES else np.float64
    return arr if arr.dtype == dtype else arr.astype(dtype)


def rows_view(x: np.ndarray) -> np.ndarray:
    """``x`` as 2-D (rows, last axis) for the kernels: 0-d and 1-d become one row."""
    return x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])


def labels(t, rows: int, classes: int, name: str = "t", one_hot: bool = False) -> np.ndarray:
    """Class labels as a C-contiguous int64 array of shape (rows,), each in [0, classes):
    what every kernel that takes labels is given.  Integer labels are taken as they
    are; with ``one_hot``, a (rows, classes) array is taken row by row by its highest
    entry, as the book's ``accuracy`` does (``np.argmax(t, axis=1)``)."""
    t = np.asarray(t)
    if one_hot and t.ndim == 2:
        if t.shape != (rows, classes):
            raise ValueError(f"one-hot labels {name} have shape {t.shape}, expected {(rows, classes)}")
        # an argmax over `classes` columns: in range by construction
        return np.ascontiguousarray(np.argmax(t, axis=1), dtype=np.int64)
    if t.ndim != 1 or t.shape[0] != rows:
        raise ValueError(f"labels {name} have shape {t.shape} but there are {rows} rows")
    if t.dtype.kind not in "iu":
        raise TypeError(
            f"integer labels {name} must have an integer dtype, got {t.dtype}; "
            "pass one-hot labels as a 2-D array of one row per sample"
        )
    if rows:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"label {bad} in {name} is out of range for {classes} classes "
                             f"(outside [0, {classes}))")
    return np.ascontiguousarray(t, dtype=np.int64)


def describe_nonfinite(arr: np.ndarray, name: str) -> str | None:
    """Where ``arr`` first holds NaN or inf, as a sentence; ``None`` when it is finite."""
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{name} contains {arr[index]} at index {index} ({int(bad.sum())} non-finite values)"
