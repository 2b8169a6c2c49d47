"""Scratch arrays the compiled backends' wrappers keep between calls, per thread.

A call of the engine that runs one step (``mlp_gradient``, a Trainer's batches for an
optimiser of the user's) would otherwise map, fault in and unmap a few hundred KB of
work arrays each time, which costs more than the step.  Each thread has its own, so
calls from several threads (the kernels release the GIL) never share one.
"""

from __future__ import annotations

import threading

import numpy as np

_held = threading.local()


def buffer(name: str, size: int, dtype) -> np.ndarray:
    """This thread's scratch array ``name`` of ``size`` elements of ``dtype`` (grown when
    a call needs more; its contents are whatever the last call left)."""
    arrays = getattr(_held, "arrays", None)
    if arrays is None:
        arrays = _held.arrays = {}
    key = (name, np.dtype(dtype))
    a = arrays.get(key)
    if a is None or a.shape[0] < size:
        a = arrays[key] = np.empty(size, dtype)
    return a[:size]
