"""Shared fixtures: where the reference data lives, and the backends under test."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

import fastnet
from fastnet import backend

# Tests never touch the user's cache or data settings: downloads and parsed arrays go
# to a throw-away cache for this test session.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fastnet-test-cache-")
os.environ.pop("FASTNET_DATA", None)

ROOT = Path(__file__).resolve().parent.parent
#: ``../shared/data`` beside the checkout (read-only), or FASTNET_TEST_DATA.
DATA = Path(os.environ.get("FASTNET_TEST_DATA", ROOT.parent / "shared" / "data"))

COMPILED = ("numba", "cython")
ALL_BACKENDS = ("numpy",) + COMPILED


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: a child inherits
    SIGINT ignored when the tests run in a background job of a non-interactive shell, and
    Python then installs no KeyboardInterrupt handler, so the signal would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def data_path(*parts) -> Path:
    """A path under the reference data folder.  Without the folder (a machine outside
    this workplace) the test skips saying what is missing; with the folder there, a
    missing file is a failure, not a skip (CI always has the folder)."""
    path = DATA.joinpath(*parts)
    if DATA.is_dir() and not path.exists():
        pytest.fail(f"{path} is missing from the reference data folder {DATA}")
    if not path.exists():
        pytest.skip(
            f"reference data {path} is not here (set FASTNET_TEST_DATA to a folder "
            "holding mnist/ and book/ to run this test)"
        )
    return path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return data_path("mnist")


@pytest.fixture(scope="session")
def book_weights() -> Path:
    return data_path("book", "sample_weight.pkl")


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    """Runs the test once on every backend (a backend that fails to load fails the test)."""
    with fastnet.use_backend(request.param):
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=["native", "narrow"])
def vectors(request):
    """The Cython sparse loops and mlp_gradient's non-zeros as built for this CPU, or
    (narrow) as built for a CPU without AVX-512 (32-byte vectors, no vector top; the same
    where the CPU has none), so that a CPU with AVX-512 tests both builds.  Tests of other
    backends skip "narrow"."""
    if request.param == "narrow":
        if request.node.callspec.params.get("backend_name", "cython") != "cython":
            pytest.skip("the vector builds are the Cython backend's")
        if "cython" not in backend.available_backends():
            pytest.skip("the Cython extension is not built")
        from fastnet.kernels import _cython

        before = _cython._narrow_vectors(True)
        request.addfinalizer(lambda: _cython._narrow_vectors(before))
    return request.param
