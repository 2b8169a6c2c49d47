"""Downloading data files: mirrors in order, streamed, verified, written atomically."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..io import part_name
from .idx import DatasetError

CHUNK = 1 << 16


class _Progress:
    """A one-line progress bar on a stream (stderr by default)."""

    def __init__(self, label: str, total: int | None, stream=None):
        self.label, self.total = label, total
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self._last = 0.0

    def update(self, n: int, force: bool = False):
        self.done += n
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        else:
            text = f"\r{self.label} {self.done / 1e6:.1f} MB"
        self.stream.write(text)
        self.stream.flush()

    def close(self):
        self.update(0, force=True)
        self.stream.write("\n")
        self.stream.flush()


def download(
    urls: list[str],
    dest: Path,
    verify: Callable[[Path], None],
    *,
    max_bytes: int | None = None,
    timeout: float = 30.0,
    deadline: float = 300.0,
    progress: bool = True,
    stream=None,
) -> Path:
    """Fetch ``dest`` from the first of ``urls`` that delivers a file passing ``verify``.

    Each attempt streams into a temporary file beside ``dest``; only a complete file
    that ``verify`` accepts is renamed to ``dest``.  An attempt is abandoned when the
    server announces or sends more than ``max_bytes``, when it is silent for
    ``timeout`` seconds, or when it has not finished within ``deadline`` seconds.
    Whatever goes wrong (HTTP error, dropped connection, short transfer, too long or
    too slow a transfer, checksum mismatch, Ctrl-C) the temporary file is removed.
    When every mirror fails, :class:`DatasetError` lists each URL and why.
    """
    import http.client  # here, not at import: loading data from disk needs no network code
    import urllib.error

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=part_name(dest), suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                _fetch(url, out, dest.name, max_bytes, timeout, deadline, progress, stream)
            verify(tmp)
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError, DatasetError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{url}: {reason}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DatasetError(
        f"could not download {dest.name}:\n  " + "\n  ".join(failures)
    )


def _fetch(url, out, name, max_bytes, timeout, deadline, progress, stream) -> None:
    """Stream ``url`` into the open file ``out`` within the limits of :func:`download`."""
    import urllib.request

    give_up = time.monotonic() + deadline
    with urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise DatasetError(f"the server announces {total} bytes; the file has at most {max_bytes}")
        bar = _Progress(f"downloading {name}", total, stream) if progress else None
        received = 0
        while True:
            # read1: whatever has arrived (up to CHUNK), so that a trickle of bytes
            # still comes back here to be held against the deadline
            chunk = response.read1(CHUNK)
            if not chunk:
                break
            received += len(chunk)
            if max_bytes is not None and received > max_bytes:
                raise DatasetError(f"the server sent more than {max_bytes} bytes, more than the file has")
            out.write(chunk)
            if bar:
                bar.update(len(chunk))
            if time.monotonic() > give_up:
                raise DatasetError(f"not finished after {deadline:.0f} s ({received} bytes received)")
        if bar:
            bar.close()
        if total is not None and received != total:
            raise DatasetError(f"transfer ended after {received} of {total} bytes")


def gzip_bound(payload: int) -> int:
    """The most bytes a gzip file of a ``payload``-byte file can take: deflate's stored
    blocks add 5 bytes per 16 KiB at worst, the gzip header and trailer a few dozen
    (a file name in the header is allowed a kilobyte)."""
    return payload + 5 * (payload // 16384 + 1) + 1024
