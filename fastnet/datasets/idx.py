"""Reading IDX files (the MNIST format), gzip-compressed or not.

An IDX file is a big-endian header — two zero bytes, a type code (0x08: unsigned
byte), the number of dimensions, then one uint32 per dimension — followed by the
payload.  Parsing is ``gzip.decompress`` + ``np.frombuffer``: no Python loops.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np


class DatasetError(Exception):
    """A data file that is missing, corrupt, or cannot be fetched: the message says which and why."""


def read_payload(path: Path) -> bytes:
    """The decompressed bytes of ``path`` (``.gz`` is decompressed, anything else read as is)."""
    raw = Path(path).read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path} is not a valid gzip file ({exc}); it may be truncated") from exc


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
    expected_len = header_len + int(np.prod(dims))
    if len(payload) != expected_len:
        raise DatasetError(
            f"{source}: payload is {len(payload)} bytes but the header {dims} needs {expected_len}"
            f" ({'truncated' if len(payload) < expected_len else 'trailing bytes'})"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_len).reshape(dims)
