"""Where the BLAS that SciPy loaded keeps its thread setting (for the Cython backend).

The Cython kernels call BLAS through ``scipy.linalg.cython_blas``.  Between OpenMP
regions (the sparse kernels) BLAS must run on the calling thread alone, so the Cython
module sets OpenBLAS's per-thread count around those calls through the functions found
here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

#: OpenBLAS's idle threads spin 2**n CPU cycles after their last work before they sleep:
#: n = OPENBLAS_THREAD_TIMEOUT, read once, when the library loads (28 by default, a tenth
#: of a second; OpenBLAS takes 4 to 30).  fastnet loads SciPy's OpenBLAS with this n
#: (see spin_briefly).
BLAS_SPIN = 22


@contextlib.contextmanager
def spin_briefly():
    """Load a BLAS library inside this: its idle threads then spin 2**BLAS_SPIN cycles
    (about a millisecond) before they sleep, not OpenBLAS's tenth of a second.  Its
    threads start idle, so with the default the library would keep one core busy for a
    tenth of a second after it loads, while the kernels' first calls want both
    (benchmarks/README.md has the figures); between the products of a kernel call, a
    millisecond is long enough.  A setting of the user's is left alone, and the
    environment is as it was afterwards."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        yield
        return
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(BLAS_SPIN)
    try:
        yield
    finally:
        os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)


def openblas_threads_local() -> list[int]:
    """The addresses of ``openblas_set_num_threads_local`` (OpenBLAS 0.3.27 on: the BLAS
    threads of the calling thread) in every OpenBLAS this process has loaded (NumPy and
    SciPy each bring their own), found through /proc/self/maps; none with another BLAS
    or another OS."""
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []
    found = []
    for lib in paths:
        try:
            found.append(ctypes.cast(ctypes.CDLL(lib).openblas_set_num_threads_local, ctypes.c_void_p).value)
        except (OSError, AttributeError):
            continue
    return [a for a in found if a]


_setters = None


class one_thread:
    """``with one_thread():`` BLAS calls from this thread use one thread (every OpenBLAS
    loaded), as they had before afterwards.  For kernels that call BLAS between parallel
    regions of their own, whose threads keep the cores busy a while after each region
    (the Numba backend's sparse kernels; benchmarks/README.md has the figures)."""

    def __enter__(self):
        global _setters
        if _setters is None:
            import scipy.linalg.cython_blas  # noqa: F401  (the BLAS that the kernels call is loaded)

            kind = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
            _setters = [kind(address) for address in openblas_threads_local()]
        self._had = [setter(1) for setter in _setters]
        return self

    def __exit__(self, *exc):
        for setter, had in zip(_setters, self._had):
            setter(had)
