"""Saving and loading parameters.

fastnet's own weight files are ``.npz`` (NumPy's zip of arrays; nothing executes on
load).  The book ships its chapter-3 weights as a pickle, ``sample_weight.pkl``;
:func:`load_book_params` reads such files through a restricted unpickler that only
rebuilds NumPy arrays and refuses anything else.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["save_params", "load_params", "load_book_params", "UnsafePickleError", "atomic_write",
           "remove_stale_parts"]


def _read_umask() -> int:
    """The process's umask (read once, at import: reading it means setting it, which
    must not race with threads that create files)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def part_name(path) -> str:
    """The prefix of a temporary file that will become ``path``: hidden, and tagged with
    this process's id so that :func:`remove_stale_parts` can tell a dead writer's."""
    return f".{Path(path).name}.{os.getpid()}."


def remove_stale_parts(folder) -> list[Path]:
    """Delete the temporary ``.part`` files in ``folder`` left by processes that are no
    longer running (killed while writing); returns what was removed."""
    removed = []
    try:
        candidates = list(Path(folder).glob(".*.part"))
    except OSError:
        return removed
    for part in candidates:
        pid = part.name[:-len(".part")].split(".")[-2:-1]
        if not (pid and pid[0].isdigit()) or _alive(int(pid[0])):
            continue
        try:
            part.unlink()
            removed.append(part)
        except OSError:
            pass  # another process cleaned it first, or the folder is read-only
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def atomic_write(path, write) -> Path:
    """Create ``path`` by calling ``write(binary_file)`` on a temporary file beside it,
    then renaming it into place: an interrupted write never leaves a partial file.
    The file gets the permissions a plain ``open`` would give (the umask's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=part_name(path), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_UMASK)
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
    """Read a ``.npz`` written by :func:`save_params` (no pickle allowed).

    Each member's header is checked against the member's size before its array is
    made, so a header that claims more data than the file holds is refused without
    allocating what it claims."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        _check_npz_members(path)
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable .npz weights file ({exc})") from exc


def _check_npz_members(path: Path) -> None:
    """Every ``.npy`` member of the zip holds the bytes its header announces."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"member {info.filename}: .npy format version {version} is not supported")
                shape, _, dtype = read_header(member)
                needs = math.prod(shape) * dtype.itemsize
                if member.tell() + needs != info.file_size:
                    raise ValueError(f"member {info.filename}: its header announces {shape} of {dtype} "
                                     f"({needs} bytes), the member holds {info.file_size - member.tell()}")


class _NotCallable:
    """Stands for ``numpy.ndarray`` inside a pickle: it may be named as the class that
    ``_reconstruct`` rebuilds, but not called (``ndarray(shape, dtype, buffer, offset,
    strides)`` makes arrays of any size from a few bytes, or uninitialised ones)."""


_NDARRAY = _NotCallable()


def _reconstruct(cls, shape, typecode):
    """The empty array that an ndarray's pickle then fills (its ``__setstate__`` checks
    that the data it gets matches the shape and dtype it sets)."""
    if cls is not _NDARRAY or tuple(shape) != (0,):
        raise UnsafePickleError("refusing an array reconstruction that is not numpy's own")
    return np.ndarray((0,), np.uint8)


def _frombuffer(buf, dtype, shape, order):
    """Protocol 5's form of an array: its bytes in the pickle, then shape and order."""
    if not isinstance(buf, (bytes, bytearray)) or not _plain_dtype(dtype) or order not in "CF":
        raise UnsafePickleError("refusing an array made from anything but the pickle's own bytes")
    array = np.frombuffer(buf, dtype=dtype).copy()  # holds no export of the pickle's buffer
    return array.reshape(shape[::-1]).T if order == "F" else array.reshape(shape)


def _flag(value) -> bool:
    return type(value) in (bool, int) and value in (0, 1)


def _dtype(spec, align=False, copy=False):
    """``numpy.dtype`` as numpy's pickles call it: a type code and two flags (bools, or
    0 and 1 in older pickles such as the book's)."""
    if not isinstance(spec, str) or not _flag(align) or not _flag(copy):
        raise UnsafePickleError(f"refusing a dtype made from {spec!r}, {align!r}, {copy!r}")
    return np.dtype(spec, bool(align), bool(copy))


def _latin1_bytes(text, encoding):
    """How protocols 0-2 spell bytes: ``_codecs.encode(str, "latin1")``, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("refusing _codecs.encode for anything but bytes spelt in latin-1")
    return text.encode("latin-1")


def _plain_dtype(dtype) -> bool:
    """A dtype of plain numbers: no fields, no subarray, no object references."""
    return (isinstance(dtype, np.dtype) and dtype.kind in "fiub" and not dtype.hasobject
            and dtype.names is None and dtype.subdtype is None)


def _checked_build(self):
    """BUILD (``obj.__setstate__(state)``) only in the forms numpy writes for plain
    numeric arrays: a dtype's state without fields, subarray or flags (flags could mark
    raw bytes as object references), an array's state with a plain dtype and raw bytes."""
    state, obj = self.stack[-1], self.stack[-2]
    if isinstance(obj, np.dtype):
        ok = isinstance(state, tuple) and len(state) == 8 and state[2:5] == (None, None, None) and state[7] == 0
    elif isinstance(obj, np.ndarray):
        ok = (isinstance(state, tuple) and len(state) == 5 and _plain_dtype(state[2])
              and isinstance(state[4], (bytes, bytearray)))
    else:
        ok = False
    if not ok:
        what = "dtype" if isinstance(obj, np.dtype) else type(obj).__name__
        raise UnsafePickleError(f"refusing to set the state of a {what} to {str(state)[:80]}")
    pickle._Unpickler.load_build(self)


class _ArrayOnlyUnpickler(pickle._Unpickler):
    """Rebuilds NumPy arrays and plain containers; every other global is refused, and
    the state of what it rebuilds is checked first (_checked_build).  The pure-Python
    unpickler, whose opcodes can be checked one by one (weights files are small)."""

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _checked_build}

    ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _dtype,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module, name):
        found = self.ALLOWED.get((module.replace("numpy.core", "numpy._core", 1), name))
        if found is None:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a weights pickle may only contain NumPy arrays"
            )
        return found


def load_book_params(path) -> dict[str, np.ndarray]:
    """Load the book's ``sample_weight.pkl`` (or any pickled dict of str -> array) safely.

    Only NumPy arrays can be rebuilt; a pickle that names any other class or function
    raises :class:`UnsafePickleError` before anything runs.  The result must be a dict
    of string keys to numeric arrays, whose data all comes from the file (no array may
    claim more bytes than the file has); each is returned as a contiguous array of its own.
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
    params = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise UnsafePickleError(
                f"{path}: entry {key!r} is {type(value).__name__}"
                f"{'' if not isinstance(value, np.ndarray) else ' of dtype ' + str(value.dtype)}; "
                "expected numeric arrays under string keys"
            )
        if value.nbytes > len(data):
            raise UnsafePickleError(
                f"{path}: entry {key!r} claims {value.shape} of {value.dtype} ({value.nbytes} bytes), "
                f"more than the file's {len(data)} bytes"
            )
        params[key] = np.array(value, order="C")
    return params
