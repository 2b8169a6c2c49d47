"""Which kernel table is active.

Three backends implement the kernel contract (:mod:`fastnet.kernels.contract`):

========  ==============================  ==========================================
name      module                          needs
========  ==============================  ==========================================
numpy     fastnet.kernels.reference       nothing (alias: ``reference``)
numba     fastnet.kernels.numba_backend   numba + scipy (JIT, compiled on first use)
cython    fastnet.kernels.cython_backend  the compiled extension built with fastnet
========  ==============================  ==========================================

``auto`` (the default) is the fastest one available, in the order cython, numba, numpy.
Choose with :func:`set_backend`, temporarily with :func:`use_backend`, or for a whole
process with the environment variable ``FASTNET_BACKEND``.  Nothing is imported until
the first kernel is needed, so ``import fastnet`` stays fast.
"""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager

from fastnet.kernels import contract

BACKENDS = ("numpy", "numba", "cython")
AUTO_ORDER = ("cython", "numba", "numpy")
ALIASES = {"reference": "numpy", "ref": "numpy"}
_MODULES = {
    "numpy": "fastnet.kernels.reference",
    "numba": "fastnet.kernels.numba_backend",
    "cython": "fastnet.kernels.cython_backend",
}
_HOW_TO_GET = {
    "numpy": "it ships with fastnet",
    "numba": "install Numba and SciPy: pip install numba scipy",
    "cython": (
        "the compiled extension fastnet.kernels._cython is not built; reinstall fastnet "
        "from a wheel or from source with a C compiler (pip install . or pip install -e .)"
    ),
}


class BackendError(ValueError):
    """A backend that is unknown, not installed, or that breaks the kernel contract."""


_tables: dict = {}
_errors: dict[str, str] = {}
_active = None  # the active kernel table (a module)
_active_name: str | None = None


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key != "auto" and key not in BACKENDS:
        raise BackendError(
            f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
        )
    return key


def _load(name: str):
    """Import backend ``name`` (canonical) and check it implements the whole contract."""
    if name in _tables:
        return _tables[name]
    if name in _errors:
        raise BackendError(_errors[name])
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        _errors[name] = f"backend {name!r} is not available ({exc}); {_HOW_TO_GET[name]}"
        raise BackendError(_errors[name]) from exc
    missing = contract.missing(module)
    if missing:
        _errors[name] = f"backend {name!r} does not implement the kernels {', '.join(missing)}"
        raise BackendError(_errors[name])
    _tables[name] = module
    return module


def load(name: str):
    """The kernel table of backend ``name`` (not made active).  ``auto`` resolves."""
    key = _canonical(name)
    if key == "auto":
        key = _resolve_auto()
    return _load(key)


def _resolve_auto() -> str:
    for name in AUTO_ORDER:
        try:
            _load(name)
            return name
        except BackendError:
            continue
    raise BackendError("no backend could be loaded")  # pragma: no cover - numpy always loads


def available_backends() -> list[str]:
    """Names of the backends that load on this machine, fastest first."""
    out = []
    for name in AUTO_ORDER:
        try:
            _load(name)
            out.append(name)
        except BackendError:
            pass
    return out


def why_unavailable(name: str) -> str | None:
    """Why ``name`` does not load, or ``None`` when it does."""
    try:
        load(name)
        return None
    except BackendError as exc:
        return str(exc)


def set_backend(name: str) -> str:
    """Make ``name`` ('numpy', 'numba', 'cython' or 'auto') the active backend.

    Returns the name of the backend now active.  Raises :class:`BackendError`, saying
    why and how to get it, when the backend cannot be loaded.
    """
    global _active, _active_name
    key = _canonical(name)
    if key == "auto":
        key = _resolve_auto()
    table = _load(key)
    _active, _active_name = table, key
    return key


def get_backend() -> str:
    """The name of the active backend (resolving ``FASTNET_BACKEND``/auto on first use)."""
    if _active is None:
        _init_from_env()
    return _active_name


def kernels():
    """The active kernel table: a module defining every kernel of the contract."""
    if _active is None:
        _init_from_env()
    return _active


def _init_from_env():
    name = os.environ.get("FASTNET_BACKEND", "auto") or "auto"
    try:
        set_backend(name)
    except BackendError as exc:
        raise BackendError(f"FASTNET_BACKEND={name!r}: {exc}") from exc


def get_num_threads() -> int:
    """How many threads the active backend's kernels may use when called from this
    thread: OpenMP's setting for Cython (``OMP_NUM_THREADS``, else one per core), Numba's
    for Numba (``NUMBA_NUM_THREADS``), 1 for the NumPy reference (NumPy's BLAS keeps its
    own threads)."""
    return kernels().get_num_threads()


def set_num_threads(n: int) -> int:
    """Let the active backend's kernels called from this thread use ``n`` threads from
    now on (as ``torch.set_num_threads``; OpenMP and Numba keep this setting per calling
    thread).  No kernel's result depends on it: the parallel kernels split their work so
    that no sum changes order with the number of threads.  Returns the previous number.
    The NumPy reference accepts any ``n`` and stays on the calling thread."""
    table = kernels()
    previous = table.get_num_threads()
    table.set_num_threads(n)
    return previous


@contextmanager
def use_backend(name: str):
    """Run a block with backend ``name`` active, restoring the previous one after."""
    global _active, _active_name
    previous = (_active, _active_name)
    set_backend(name)
    try:
        yield _active_name
    finally:
        _active, _active_name = previous
