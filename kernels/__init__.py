"""fastnet's kernels: one contract (:mod:`.contract`), three implementations.

* :mod:`.reference` — pure NumPy, the book's math; the oracle and the baseline.
* :mod:`.numba_backend` — ``@njit(cache=True)`` kernels, compiled lazily on first call.
* :mod:`.cython_backend` — the compiled extension ``_cython`` built into the wheel.

This folder is installed as the subpackage ``fastnet.kernels`` (``package_dir`` in
``setup.py``).  Importing it imports no backend: :mod:`fastnet.backend` loads them on
demand, so ``import fastnet`` never imports Numba.
"""
