"""Downloading data files: mirrors in order, streamed, verified, written atomically."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

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
    timeout: float = 30.0,
    progress: bool = True,
    stream=None,
) -> Path:
    """Fetch ``dest`` from the first of ``urls`` that delivers a file passing ``verify``.

    Each attempt streams into a temporary file beside ``dest``; only a complete file
    that ``verify`` accepts is renamed to ``dest``.  Whatever goes wrong (HTTP error,
    dropped connection, short transfer, checksum mismatch, Ctrl-C) the temporary file
    is removed.  When every mirror fails, :class:`DatasetError` lists each URL and why.
    """
    import http.client  # here, not at import: loading data from disk needs no network code
    import urllib.error
    import urllib.request

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    bar = _Progress(f"downloading {dest.name}", total, stream) if progress else None
                    received = 0
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        received += len(chunk)
                        if bar:
                            bar.update(len(chunk))
                    if bar:
                        bar.close()
                    if total is not None and received != total:
                        raise DatasetError(f"transfer ended after {received} of {total} bytes")
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
