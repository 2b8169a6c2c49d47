"""Choosing backends: set/use/env/auto, clear errors, and a fast import."""

import subprocess
import sys

import pytest

import fastnet
from fastnet import backend
from fastnet.kernels import contract


def test_every_backend_implements_the_contract():
    for name in ("numpy", "numba", "cython"):
        assert contract.missing(backend.load(name)) == [], name


def test_available_and_auto_order():
    names = backend.available_backends()
    assert names == ["cython", "numba", "numpy"]
    with fastnet.use_backend("auto") as chosen:
        assert chosen == "cython"


def test_use_backend_restores():
    before = fastnet.get_backend()
    with fastnet.use_backend("numba"):
        assert fastnet.get_backend() == "numba"
        with fastnet.use_backend("reference"):
            assert fastnet.get_backend() == "numpy"
        assert fastnet.get_backend() == "numba"
    assert fastnet.get_backend() == before


def test_unknown_backend():
    with pytest.raises(backend.BackendError, match="unknown backend 'torch'.*numpy, numba, cython"):
        fastnet.set_backend("torch")


def test_unavailable_backend_says_why_and_how(monkeypatch):
    monkeypatch.setitem(backend._MODULES, "cython", "fastnet.kernels._not_built")
    monkeypatch.delitem(backend._tables, "cython", raising=False)
    monkeypatch.setattr(backend, "_errors", {})
    with pytest.raises(backend.BackendError, match="not available.*pip install"):
        fastnet.set_backend("cython")
    assert "cython" not in backend.available_backends()
    with fastnet.use_backend("auto") as chosen:
        assert chosen == "numba"


def test_broken_backend_is_an_error(monkeypatch):
    import types

    fake = types.ModuleType("fake")
    fake.relu = lambda x, out: out
    monkeypatch.setitem(sys.modules, "fastnet_fake_backend", fake)
    monkeypatch.setitem(backend._MODULES, "numba", "fastnet_fake_backend")
    monkeypatch.delitem(backend._tables, "numba", raising=False)
    monkeypatch.setattr(backend, "_errors", {})
    with pytest.raises(backend.BackendError, match="does not implement the kernels step, sigmoid"):
        fastnet.set_backend("numba")


def _run(code, **env):
    import os

    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)


def test_environment_variable():
    out = _run("import fastnet; print(fastnet.get_backend())", FASTNET_BACKEND="numba")
    assert out.stdout.strip() == "numba", out.stderr
    bad = _run("import fastnet; fastnet.get_backend()", FASTNET_BACKEND="nope")
    assert bad.returncode != 0 and "FASTNET_BACKEND='nope'" in bad.stderr


def test_import_is_fast_and_lazy():
    code = (
        "import sys, time; t = time.perf_counter(); import fastnet, fastnet.nets, fastnet.layers; "
        "print(time.perf_counter() - t, 'numba' in sys.modules, 'fastnet.kernels._cython' in sys.modules)"
    )
    out = _run(code)
    seconds, numba_loaded, cython_loaded = out.stdout.split()
    assert numba_loaded == "False" and cython_loaded == "False"
    assert float(seconds) < 1.0


@pytest.mark.skipif("cython" not in backend.available_backends(), reason="the Cython extension is not built")
@pytest.mark.parametrize("scipy_first", [False, True], ids=["fastnet first", "scipy.linalg first"])
def test_cython_blas_without_scipy_linalg(scipy_first):
    """The Cython backend takes sgemm/dgemm from scipy.linalg.cython_blas without importing
    the package scipy.linalg (0.13 s of start-up); scipy.linalg imported before or after
    it still works, and the products are BLAS's."""
    code = "\n".join([
        "import sys, numpy as np",
        "import scipy.linalg" if scipy_first else "",
        "from fastnet.kernels import _cython as k",
        "print('scipy.linalg' in sys.modules)",
        "import scipy.linalg.cython_blas as cb, scipy.linalg",
        "assert 'sgemm' in cb.__pyx_capi__",
        "assert np.allclose(scipy.linalg.solve(2 * np.eye(3), np.ones(3)), 0.5)",
        "x, w = np.random.default_rng(0).random((2, 70, 70))",
        "out = np.empty((70, 70))",
        "k.affine(x, w, np.zeros(70), out)",
        "assert np.allclose(out, x @ w), 'dgemm'",
        "o32 = np.empty((70, 70), np.float32)",
        "k.affine(x.astype(np.float32), w.astype(np.float32), np.zeros(70, np.float32), o32)",
        "assert np.allclose(o32, x @ w, rtol=1e-4), 'sgemm'",
        "print('ok')",
    ])
    out = _run(code)
    assert out.returncode == 0, out.stderr
    loaded, ok = out.stdout.split()
    assert ok == "ok" and loaded == str(scipy_first)
