"""fastnet: the toolkit of "Deep Learning from Scratch" (chapters 3-5), compiled.

The book's names (``fastnet.functions``, ``fastnet.gradient``, ``fastnet.layers``,
``fastnet.nets``) on top of one kernel contract with three backends: the NumPy
reference, Numba and Cython.  See :mod:`fastnet.backend` for choosing one.

Importing fastnet imports neither Numba nor any compiled kernel: backends load on
first use.
"""

from .backend import available_backends, get_backend, get_num_threads, set_backend, set_num_threads, use_backend

__version__ = "0.1.0"

__all__ = ["available_backends", "get_backend", "get_num_threads", "set_backend", "set_num_threads", "use_backend",
           "__version__"]
