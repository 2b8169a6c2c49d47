"""Saving and loading parameters.

fastnet's own weight files are ``.npz`` (NumPy's zip of arrays; nothing executes on
load).  The book ships its chapter-3 weights as a pickle, ``sample_weight.pkl``;
:func:`load_book_params` reads such files through a restricted unpickler that only
rebuilds NumPy arrays and refuses anything else.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["save_params", "load_params", "load_book_params", "UnsafePickleError", "atomic_write"]


def atomic_write(path, write) -> Path:
    """Create ``path`` by calling ``write(binary_file)`` on a temporary file beside it,
    then renaming it into place: an interrupted write never leaves a partial file.
    The file gets the permissions a plain ``open`` would give (the umask's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that is not a plain dict of NumPy arrays."""


def save_params(path, params) -> Path:
    """Write ``params`` (a dict of name -> array) to ``path`` as ``.npz``, atomically.

    The file is written beside its destination and renamed into place, so an
    interrupted save never leaves a half-written file under ``path``.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = {}
    for key, value in dict(params).items():
        if not isinstance(key, str):
            raise TypeError(f"parameter names must be strings, got {key!r}")
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiubU":  # numbers, or text metadata (no objects: no pickle)
            raise TypeError(f"parameter {key} must be numeric, got dtype {arr.dtype}")
        arrays[key] = arr
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_params(path) -> dict[str, np.ndarray]:
    """Read a ``.npz`` written by :func:`save_params` (no pickle allowed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable .npz weights file ({exc})") from exc


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds NumPy arrays and plain containers; every other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            if module.startswith("numpy.core"):
                module = module.replace("numpy.core", "numpy._core", 1)
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: a weights pickle may only contain NumPy arrays"
        )


def load_book_params(path) -> dict[str, np.ndarray]:
    """Load the book's ``sample_weight.pkl`` (or any pickled dict of str -> array) safely.

    Only NumPy arrays can be rebuilt; a pickle that names any other class or function
    raises :class:`UnsafePickleError` before anything runs.  The result must be a dict
    of string keys to numeric arrays.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    data = path.read_bytes()
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise UnsafePickleError(f"{path} is not a readable weights pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise UnsafePickleError(f"{path} holds a {type(obj).__name__}, expected a dict of arrays")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise UnsafePickleError(
                f"{path}: entry {key!r} is {type(value).__name__}"
                f"{'' if not isinstance(value, np.ndarray) else ' of dtype ' + str(value.dtype)}; "
                "expected numeric arrays under string keys"
            )
    return obj
