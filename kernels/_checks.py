"""Argument checks shared by the Python-side wrappers of the backends.

The MLP engine's kernels (``*_mlp``) are checked here for all three backends: the
compiled code behind them trusts what these functions return.  For the older
kernels the reference backend needs none but ``threads`` (NumPy raises on its own)
and the Cython backend does the same checks in C.  Each check names the argument and
both shapes or dtypes.
"""

from __future__ import annotations

import numpy as np

from .contract import OPT_FIELDS, OPT_KIND, OPT_LR, Act, Opt, mlp_size

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


_F32, _F64, _I64 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64)


def ready(a, out, t=None) -> bool:
    """The common case, checked in one expression: ``a`` and ``out`` C-contiguous 2-D
    arrays of one float dtype and one shape, ``out`` writeable, and ``t`` (if given)
    C-contiguous int64 labels, one per row.  When False, the full checks run and say
    what is wrong."""
    return (
        type(a) is np.ndarray and type(out) is np.ndarray and a.ndim == 2
        and (a.dtype is _F32 or a.dtype is _F64) and out.dtype is a.dtype and out.shape == a.shape
        and a.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable
        and (t is None or (type(t) is np.ndarray and t.dtype is _I64 and t.ndim == 1
                           and t.shape[0] == a.shape[0] and t.flags.c_contiguous))
    )


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


def labels(t, rows: int, classes: int):
    """Integer labels as a C-contiguous int64 array of shape (rows,), each in
    [0, classes): the kernels index rows by them, so a label out of range is refused
    here rather than read or written past the end of a row."""
    if not (type(t) is np.ndarray and t.dtype == np.int64 and t.flags.c_contiguous):
        t = np.ascontiguousarray(t, dtype=np.int64)
    if t.shape != (rows,):
        raise ValueError(f"labels have shape {t.shape}, expected ({rows},)")
    if rows and (t.min() < 0 or t.max() >= classes):
        raise ValueError(label_error(t, classes))
    return t


def label_error(t, classes: int) -> str:
    """The message for labels ``t`` of which some lie outside [0, classes)."""
    where = int(np.flatnonzero((t < 0) | (t >= classes))[0])
    return f"label {int(t[where])} at index {where} is out of range for {classes} classes [0, {classes})"


def csr(indptr, indices, data, dtype, who: str):
    """CSR rows: int64 indptr, int32 indices, data uint8 or ``dtype``, all 1-D contiguous."""
    for name, a, want in (("indptr", indptr, np.int64), ("indices", indices, np.int32)):
        if type(a) is not np.ndarray or a.dtype != want or a.ndim != 1 or not a.flags.c_contiguous:
            raise TypeError(f"{who}: {name} must be a C-contiguous 1-D {np.dtype(want)} array")
    if type(data) is not np.ndarray or data.ndim != 1 or not data.flags.c_contiguous:
        raise TypeError(f"{who}: data must be a C-contiguous 1-D array")
    if data.dtype != np.uint8 and data.dtype != dtype:
        raise TypeError(f"{who}: data is {data.dtype}; it must be uint8 pixels or the weights' dtype {dtype}")
    if indptr.shape[0] < 1:
        raise ValueError(f"{who}: indptr must hold at least one entry")
    if data.shape[0] != indices.shape[0]:
        raise ValueError(f"{who}: data has {data.shape[0]} entries but indices {indices.shape[0]}")


# ------------------------------------------------------------------ the MLP engine
def activation(act, identity: bool = False) -> None:
    """``act`` must be a hidden activation (relu or sigmoid), or identity where allowed."""
    allowed = ([Act.IDENTITY] if identity else []) + [Act.RELU, Act.SIGMOID]
    if act not in allowed:
        names = ", ".join(f"{int(a)} ({a.name.lower()})" for a in allowed)
        raise ValueError(f"act must be {names}, got {act!r}")


def mlp_net(sizes, act, theta, writeable=False):
    """The net of an MLP kernel: ``sizes`` as int64 (at least input and output, each
    >= 1), ``act`` relu or sigmoid, ``theta`` a C-contiguous 1-D float32/float64
    vector of exactly the length the sizes need.  Returns (sizes, dtype)."""
    if not (type(sizes) is np.ndarray and sizes.dtype == np.int64 and sizes.flags.c_contiguous):
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    widths = sizes.tolist()  # a few Python ints: quicker to check than NumPy reductions
    if sizes.ndim != 1 or len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"sizes must list at least two layer widths, each >= 1, got {widths}")
    if max(widths) > 2**31 - 1:
        raise ValueError(f"a layer of {max(widths)} units is too wide for BLAS")
    activation(act)
    dt = dtype_of(theta, "theta")
    want = mlp_size(widths)
    if theta.shape != (want,):
        raise ValueError(f"theta has shape {theta.shape}; layers {widths} need ({want},)")
    if not theta.flags.c_contiguous or (writeable and not theta.flags.writeable):
        raise ValueError("theta must be a " + ("writeable " if writeable else "") + "C-contiguous array")
    return sizes, dt


def mlp_rows(X, dt, D):
    """Dense rows of an MLP kernel: 2-D, D columns, ``dt`` or uint8 pixels, C-contiguous."""
    if type(X) is not np.ndarray or (X.dtype != dt and X.dtype != np.uint8):
        raise TypeError(f"X is {getattr(X, 'dtype', type(X).__name__)}; it must be uint8 pixels or theta's {dt}")
    if X.ndim != 2 or X.shape[1] != D:
        raise ValueError(f"X has shape {X.shape} but the first layer takes {D} inputs")
    return X if X.flags.c_contiguous else np.ascontiguousarray(X)


def mlp_batches(T, idx, n_rows, classes, ndim):
    """Labels ``T`` (int64, one per row of X) and batches ``idx`` (int64 row numbers,
    ``ndim`` 1: one batch; 2: (steps, batch)): every index in [0, n_rows) and the label
    of every row it names in [0, classes).  Returns (T, idx)."""
    if type(T) is not np.ndarray or T.dtype != np.int64 or T.ndim != 1 or not T.flags.c_contiguous:
        raise TypeError("T must be a C-contiguous 1-D int64 array of labels")
    if T.shape[0] != n_rows:
        raise ValueError(f"X has {n_rows} rows but T has {T.shape[0]} labels")
    if type(idx) is not np.ndarray or idx.dtype != np.int64:
        raise TypeError("idx must be an int64 array of row numbers")
    if idx.ndim != ndim or idx.size == 0:
        what = "a non-empty 1-D array" if ndim == 1 else "a non-empty 2-D array (steps, batch)"
        raise ValueError(f"idx must be {what} of row numbers, got shape {idx.shape}")
    idx = np.ascontiguousarray(idx)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n_rows:
        raise IndexError(f"batch index {lo if lo < 0 else hi} is out of range for {n_rows} rows")
    t = T[idx.reshape(-1)]
    if t.min() < 0 or t.max() >= classes:
        raise ValueError(label_error(t, classes))
    return T, idx


def mlp_opt(opt, state, theta):
    """The optimiser record and its state: ``opt`` float64 (OPT_FIELDS,) with a known
    kind and lr > 0, writeable (Adam counts its iterations in it); ``state`` (2, P) in
    theta's dtype, writeable and C-contiguous."""
    if (type(opt) is not np.ndarray or opt.dtype != np.float64 or opt.shape != (OPT_FIELDS,)
            or not opt.flags.writeable):
        raise TypeError(f"opt must be a writeable float64 array of {OPT_FIELDS} fields")
    if opt[OPT_KIND] not in tuple(Opt):
        raise ValueError(f"opt[0] must be an optimiser code {[int(o) for o in Opt]}, got {opt[OPT_KIND]}")
    if not opt[OPT_LR] > 0 or not np.isfinite(opt).all():
        raise ValueError(f"the optimiser needs finite settings and lr > 0, got {opt.tolist()}")
    out(state, theta.dtype, "state", (2, theta.shape[0]))


def mlp_losses(losses, steps):
    if (type(losses) is not np.ndarray or losses.dtype != np.float64 or losses.shape != (steps,)
            or not losses.flags.c_contiguous or not losses.flags.writeable):
        raise ValueError(f"losses must be a writeable C-contiguous float64 array of shape ({steps},)")


def mlp_steps(X, T, idx, sizes, act, theta, opt, state, losses, csr_rows=None):
    """Every argument of ``train_steps_mlp`` (``X`` None and ``csr_rows`` the tuple
    (indptr, indices, data) for the sparse kernel); returns (X, T, idx, sizes)."""
    sizes, dt = mlp_net(sizes, act, theta, writeable=True)
    if X is not None:
        X = mlp_rows(X, dt, sizes[0])
    T, idx = mlp_batches(T, idx, X.shape[0] if X is not None else csr_rows[0].shape[0] - 1, sizes[-1], 2)
    if X is None:
        csr(*csr_rows, dt, "train_steps_mlp_sparse")
        csr_batch(csr_rows[0], csr_rows[1], idx)
    mlp_opt(opt, state, theta)
    mlp_losses(losses, idx.shape[0])
    return X, T, idx, sizes


def mlp_gradient(X, T, idx, sizes, act, theta, decay, grad):
    """Every argument of ``mlp_gradient``; returns (X, T, idx, sizes)."""
    sizes, dt = mlp_net(sizes, act, theta)
    X = mlp_rows(X, dt, sizes[0])
    T, idx = mlp_batches(T, idx, X.shape[0], sizes[-1], 1)
    if not (decay >= 0 and np.isfinite(decay)):
        raise ValueError(f"decay must be a finite number >= 0, got {decay!r}")
    out(grad, dt, "grad", theta.shape)
    return X, T, idx, sizes


def mlp_predict(X, sizes, act, theta, labels, csr_rows=None, row0=0):
    """Every argument of ``predict_mlp`` (``X`` None: ``csr_rows`` (indptr, indices,
    data) from ``row0`` on, as many as ``labels``); returns (X, sizes)."""
    sizes, dt = mlp_net(sizes, act, theta)
    if X is not None:
        X = mlp_rows(X, dt, sizes[0])
        rows = X.shape[0]
    else:
        csr(*csr_rows, dt, "sparse_predict_mlp")
        rows = getattr(labels, "shape", (0,))[0]
        csr_range(csr_rows[0], csr_rows[1], row0, rows)
    if type(labels) is not np.ndarray or labels.dtype != np.int64 or labels.ndim != 1:
        raise TypeError("out must be a 1-D int64 array (one label per row)")
    out(labels, labels.dtype, "out", (rows,))
    return X, sizes


def csr_range(indptr, indices, row0, n):
    """Rows row0 : row0 + n of CSR rows exist and their pointers are ordered and in range."""
    if row0 < 0 or row0 + n > indptr.shape[0] - 1:
        raise IndexError(f"rows {row0}:{row0 + n} are out of range for {indptr.shape[0] - 1} CSR rows")
    p = indptr[row0 : row0 + n + 1]
    if n and (p[0] < 0 or p[-1] > indices.shape[0] or np.any(p[1:] < p[:-1])):
        raise ValueError("indptr is not a valid CSR row pointer")


def csr_batch(indptr, indices, idx):
    """The row pointers of the CSR rows named in ``idx`` are ordered and in range (their
    column indices are checked by the kernels as they read them)."""
    rows = idx.reshape(-1)
    lo, hi = indptr[rows], indptr[rows + 1]
    if lo.min() < 0 or hi.max() > indices.shape[0] or np.any(hi < lo):
        raise ValueError("indptr is not a valid CSR row pointer")


def mlp_numgrad(x, t, sizes, act, theta, h, grad):
    """Every argument of ``numerical_gradient_mlp``; returns (x, t, sizes)."""
    sizes, dt = mlp_net(sizes, act, theta)
    x = inp(x, dt, "x")
    if x.shape[1] != sizes[0]:
        raise ValueError(f"x has shape {x.shape} but the first layer takes {sizes[0]} inputs")
    t = labels(t, x.shape[0], int(sizes[-1]))
    if not (h > 0 and np.isfinite(h)):
        raise ValueError(f"h must be a finite number > 0, got {h!r}")
    out(grad, dt, "grad", theta.shape)
    return x, t, sizes


def threads(n, most: int | None = None, setting: str = "") -> int:
    """``n`` as a number of threads for ``set_num_threads``: an int (not a bool) of at
    least 1, and at most ``most`` where the backend has a ceiling (named by ``setting``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (most is not None and n > most):
        allowed = f"from 1 to {most} ({setting})" if most is not None else "of at least 1"
        raise ValueError(f"the number of threads must be an integer {allowed}, got {n!r}")
    return n
