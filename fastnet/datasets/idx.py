"""Reading IDX files (the MNIST format), gzip-compressed or not.

An IDX file is a big-endian header — two zero bytes, a type code (0x08: unsigned
byte), the number of dimensions, then one uint32 per dimension — followed by the
payload.  Parsing is ``gzip.decompress`` + ``np.frombuffer``: no Python loops.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path

import numpy as np


class DatasetError(Exception):
    """A data file that is missing, corrupt, or cannot be fetched: the message says which and why."""


def read_payload(path: Path, limit: int | None = None) -> bytes:
    """The decompressed bytes of ``path`` (``.gz`` is decompressed, anything else read as is).

    With ``limit``, a file whose payload is longer is refused after reading (and
    decompressing) ``limit + 1`` bytes: a small file that decompresses to gigabytes
    costs no more memory than the payload it should hold.
    """
    path = Path(path)
    size = -1 if limit is None else limit + 1
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                fh.seek(0)
                data = fh.read(size)
            else:
                fh.seek(0)
                with gzip.GzipFile(fileobj=fh) as gz:
                    data = gz.read(size)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path} is not a valid gzip file ({exc}); it may be truncated") from exc
    if limit is not None and len(data) > limit:
        raise DatasetError(f"{path}: the payload is longer than the {limit} bytes its data set's files hold")
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_idx(payload: bytes, ndim: int, source, count: int | None = None, shape=None) -> np.ndarray:
    """Parse an unsigned-byte IDX payload with ``ndim`` dimensions into a uint8 array.

    ``count`` (first dimension) and ``shape`` (the rest) are checked when given;
    every mismatch raises :class:`DatasetError` naming ``source``, the expected and
    the found value.
    """
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise DatasetError(f"{source}: {len(payload)} bytes is too short for an IDX header")
    magic = int.from_bytes(payload[:4], "big")
    expected_magic = 0x0800 | ndim
    if magic != expected_magic:
        raise DatasetError(
            f"{source}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if count is not None and dims[0] != count:
        raise DatasetError(f"{source}: header says {dims[0]} items, expected {count}")
    if shape is not None and tuple(dims[1:]) != tuple(shape):
        raise DatasetError(f"{source}: header says items of shape {dims[1:]}, expected {tuple(shape)}")
    expected_len = header_len + math.prod(dims)
    if len(payload) != expected_len:
        raise DatasetError(
            f"{source}: payload is {len(payload)} bytes but the header {dims} needs {expected_len}"
            f" ({'truncated' if len(payload) < expected_len else 'trailing bytes'})"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_len).reshape(dims)
