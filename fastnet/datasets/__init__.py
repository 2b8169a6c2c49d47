"""Data sets in the book's format: ``load_mnist`` and ``load_fashion_mnist``.

``load_mnist(normalize=True, flatten=True, one_hot_label=False)`` returns
``(x_train, t_train), (x_test, t_test)`` exactly as the book's ``dataset/mnist.py``:

* ``normalize``: pixels as floats in [0, 1] (``dtype``, float32 by default), else uint8;
* ``flatten``: images as rows of 784, else ``(N, 1, 28, 28)``;
* ``one_hot_label``: labels as ``(N, 10)`` one-hot rows, else uint8 class numbers.

Files are looked for in ``data_dir``, ``$FASTNET_DATA/<name>/``, the user cache
(``$XDG_CACHE_HOME/fastnet`` or ``~/.cache/fastnet``) and, for Fashion-MNIST, Debian's
``/usr/share/datasets/fashion-mnist``; missing files are downloaded into the cache
from a list of mirrors.  Every file is verified by the sha256 of its decompressed
payload and by its IDX header before use.  A verified parse is kept as ``.npy`` in
the cache (``<cache>/parsed/``) so the next load skips decompression.  fastnet never
writes into the folders it only reads from.
"""

from __future__ import annotations

import numpy as np

from .core import FASHION_MNIST, FILES, MNIST, Dataset, cache_dir, load_dataset, locate, search_dirs
from .idx import DatasetError, parse_idx

__all__ = [
    "load_mnist",
    "load_fashion_mnist",
    "load_dataset",
    "Dataset",
    "DatasetError",
    "MNIST",
    "FASHION_MNIST",
    "FILES",
    "cache_dir",
    "locate",
    "search_dirs",
    "parse_idx",
    "DATASETS",
]

DATASETS = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}


def load_mnist(normalize=True, flatten=True, one_hot_label=False, *, data_dir=None,
               dtype=np.float32, download=True, cache=True, progress=True):
    """MNIST as the book loads it: ``(x_train, t_train), (x_test, t_test)``."""
    return load_dataset(MNIST, normalize, flatten, one_hot_label, data_dir=data_dir, dtype=dtype,
                        download=download, cache=cache, progress=progress)


def load_fashion_mnist(normalize=True, flatten=True, one_hot_label=False, *, data_dir=None,
                       dtype=np.float32, download=True, cache=True, progress=True):
    """Fashion-MNIST, with the same signature and results as :func:`load_mnist`."""
    return load_dataset(FASHION_MNIST, normalize, flatten, one_hot_label, data_dir=data_dir,
                        dtype=dtype, download=download, cache=cache, progress=progress)
