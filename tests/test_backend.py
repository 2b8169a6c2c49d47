"""Choosing backends: set/use/env/auto, clear errors, and a fast import."""

import os
import subprocess
import sys

import pytest

import fastnet
from fastnet import backend
from fastnet.kernels import contract
from fastnet.kernels.contract import Act, Opt, mlp_size


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
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)


def test_environment_variable():
    out = _run("import fastnet; print(fastnet.get_backend())", FASTNET_BACKEND="numba")
    assert out.stdout.strip() == "numba", out.stderr
    bad = _run("import fastnet; fastnet.get_backend()", FASTNET_BACKEND="nope")
    assert bad.returncode != 0 and "FASTNET_BACKEND='nope'" in bad.stderr


def test_import_is_lazy():
    """Importing the package and its layers loads no compiled backend (their cost is paid
    on first use)."""
    code = (
        "import sys; import fastnet, fastnet.nets, fastnet.layers; "
        "print('numba' in sys.modules, 'fastnet.kernels._cython' in sys.modules)"
    )
    out = _run(code)
    numba_loaded, cython_loaded = out.stdout.split()
    assert numba_loaded == "False" and cython_loaded == "False"


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


@pytest.mark.parametrize("name", ["numpy", "numba", "cython"])
def test_num_threads(name):
    """set_num_threads / get_num_threads on every backend: returns the previous number,
    takes effect for this thread, refuses what is not a count of threads."""
    if name not in backend.available_backends():
        pytest.skip(f"{name} is not available here")
    with fastnet.use_backend(name):
        before = fastnet.get_num_threads()
        assert before >= 1
        try:
            assert fastnet.set_num_threads(1) == before
            assert fastnet.get_num_threads() == 1
            for bad in (0, -2, 1.5, "2", True, None):
                with pytest.raises(ValueError, match="number of threads"):
                    fastnet.set_num_threads(bad)
            assert fastnet.get_num_threads() == 1
        finally:
            fastnet.set_num_threads(before)
        assert fastnet.get_num_threads() == (1 if name == "numpy" else before)


@pytest.mark.parametrize("name", ["numba", "cython"])
def test_results_do_not_depend_on_set_num_threads(name):
    """The parallel kernels give the same bits on one thread as on all of them, so the
    command may change the number while it trains (fastnet.cli._CoreShare)."""
    import numpy as np

    if name not in backend.available_backends():
        pytest.skip(f"{name} is not available here")
    k = backend.load(name)
    rng = np.random.default_rng(3)
    X = (rng.integers(1, 256, (400, 300)) * (rng.random((400, 300)) < 0.2)).astype(np.uint8)
    T = rng.integers(0, 10, 400)
    idx = rng.integers(0, 400, (20, 100))

    def run(dtype):
        out = []
        csr = k.sparse_rows(X)
        for hidden, kind in (([50], Opt.SGD), ([40, 30], Opt.SGD), ([50], Opt.ADAM)):
            sizes = np.array([300, *hidden, 10])
            for sparse in (True, False):
                theta = (0.1 * np.random.default_rng(5).standard_normal(mlp_size(sizes))).astype(dtype)
                state, losses = np.zeros((2, theta.size), dtype), np.empty(20)
                opt = np.array([kind, 0.05, 0.9, 0.999, 0.0, 0.0])
                if sparse:
                    k.train_steps_mlp_sparse(*csr, T, idx, sizes, Act.RELU, theta, opt, state, losses)
                    out.append(k.sparse_predict_mlp(*csr, 0, sizes, Act.RELU, theta, np.empty(400, np.int64)))
                else:
                    xf = (X / 255).astype(dtype)
                    k.train_steps_mlp(xf, T, idx, sizes, Act.RELU, theta, opt, state, losses)
                    out.append(k.predict_mlp(xf, sizes, Act.RELU, theta, np.empty(400, np.int64)))
                    grad = np.empty_like(theta)
                    k.numerical_gradient_mlp(xf[:20], T[:20], sizes, Act.RELU, theta, 1e-4, grad)
                    out.append(grad)
                out += [theta, losses]
        W = (0.1 * np.random.default_rng(5).standard_normal((300, 50))).astype(dtype)
        out.append(k.sparse_affine(*csr, 0, W, W[0], 1, np.empty((400, 50), dtype)))
        return b"".join(a.tobytes() for a in out)

    before = k.get_num_threads()
    try:
        for dtype in (np.float32, np.float64):
            k.set_num_threads(1)
            one = run(dtype)
            k.set_num_threads(max(before, 2))
            assert run(dtype) == one, dtype
    finally:
        k.set_num_threads(before)


def _openblas_threads():
    """The thread count of every OpenBLAS loaded in this process (NumPy's and SciPy's)."""
    import ctypes

    with open("/proc/self/maps") as fh:
        paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    counts = []
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads"):
            if hasattr(lib, name):
                counts.append(getattr(lib, name)())
                break
    return counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_kernels_leave_blas_threads_as_they_were():
    """The steps and the evaluation call BLAS from their OpenMP threads, each held to one
    BLAS thread; OpenBLAS keeps that setting for the whole process, so a kernel that let
    its threads set and restore it unguarded could leave NumPy's products on one thread."""
    import numpy as np

    from fastnet.kernels import _cython

    k = backend.load("cython")
    rng = np.random.default_rng(0)
    X = (rng.integers(1, 256, (400, 300)) * (rng.random((400, 300)) < 0.2)).astype(np.uint8)
    T = rng.integers(0, 10, 400)
    csr = k.sparse_rows(X)
    np.ones((200, 200)) @ np.ones((200, 200))  # NumPy's OpenBLAS loaded
    blas = _cython._blas_products(True)  # every product through BLAS, whatever the CPU
    before_threads = k.get_num_threads()
    try:
        k.set_num_threads(2)
        before = _openblas_threads()
        if not before:
            pytest.skip("no OpenBLAS with a thread count to read")
        for _ in range(20):
            sizes = np.array([300, 40, 30, 10])
            theta = (0.1 * rng.standard_normal(mlp_size(sizes))).astype(np.float32)
            state, losses = np.zeros((2, theta.size), np.float32), np.empty(3)
            for kind in (Opt.SGD, Opt.ADAM):
                opt = np.array([kind, 0.05, 0.9, 0.999, 0.0, 0.0])
                idx = rng.integers(0, 400, (3, 100))
                k.train_steps_mlp(X, T, idx, sizes, Act.RELU, theta, opt, state, losses)
                k.train_steps_mlp_sparse(*csr, T, idx, sizes, Act.RELU, theta, opt, state, losses)
            # the book's two-layer SGD step (its layers above the first through BLAS here)
            two = np.array([300, 100, 10])
            theta2 = (0.1 * rng.standard_normal(mlp_size(two))).astype(np.float32)
            opt = np.array([Opt.SGD, 0.05, 0.9, 0.999, 0.0, 0.0])
            k.train_steps_mlp_sparse(*csr, T, idx, two, Act.RELU, theta2, opt, np.zeros((2, theta2.size), np.float32),
                                     losses)
            k.sparse_predict_mlp(*csr, 0, sizes, Act.RELU, theta, np.empty(400, np.int64))
            k.predict_mlp(X, sizes, Act.RELU, theta, np.empty(400, np.int64))
            assert _openblas_threads() == before
    finally:
        _cython._blas_products(blas)
        k.set_num_threads(before_threads)


_FIRST_BLAS_CALL = """
import sys, numpy as np
from fastnet.kernels import _cython as k
from fastnet.kernels.contract import Act
rng = np.random.default_rng(0)
X = (rng.integers(1, 256, (300, 40)) * (rng.random((300, 40)) < 0.3)).astype(np.uint8)
T = rng.integers(0, 10, 300)
idx = rng.integers(0, 300, (3, 20))
def net(*hidden, kind=1):
    sizes = np.array([40, *hidden, 10])
    n = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    theta = (0.1 * rng.standard_normal(n)).astype(np.float32)
    return sizes, theta, np.array([kind, 0.1, 0.9, 0.999, 0, 0]), np.zeros((2, n), np.float32), np.empty(3)
csr = k.sparse_rows(X)
sizes, theta, opt, state, losses = net(50)
k.train_steps_mlp_sparse(*csr, T, idx, sizes, Act.RELU, theta, opt, state, losses)  # AVX-512: vector top, no BLAS
k.sparse_predict_mlp(*csr, 0, sizes, Act.RELU, theta, np.empty(300, np.int64))
if k.WIDE_VECTORS:
    assert not k._blas_loaded() and "scipy" not in sys.modules, "BLAS loaded by the sparse path"
case = sys.argv[1]
x, w = rng.random((30, 20)).astype(np.float32), rng.random((20, 7)).astype(np.float32)
if case == "affine":
    got = k.affine(x, w, np.zeros(7, np.float32), np.empty((30, 7), np.float32))
    assert np.allclose(got, x @ w, rtol=1e-5)
elif case == "affine_backward":
    dW = np.empty((20, 7), np.float32)
    k.affine_backward(x, w, np.ones((30, 7), np.float32), dW, np.empty(7, np.float32))
    assert np.allclose(dW, x.T @ np.ones((30, 7)), rtol=1e-5)
elif case == "dense steps":
    sizes, theta, opt, state, losses = net(50)
    k.train_steps_mlp((X / 255).astype(np.float32), T, idx, sizes, Act.RELU, theta, opt, state, losses)
    assert np.isfinite(losses).all()
elif case == "sparse steps through BLAS":  # 70 hidden units: the rows above the first layer go through BLAS
    sizes, theta, opt, state, losses = net(70)
    k.train_steps_mlp_sparse(*csr, T, idx, sizes, Act.RELU, theta, opt, state, losses)
    assert np.isfinite(losses).all()
elif case == "deep sparse steps":
    sizes, theta, opt, state, losses = net(30, 20, kind=4)
    k.train_steps_mlp_sparse(*csr, T, idx, sizes, Act.RELU, theta, opt, state, losses)
    assert np.isfinite(losses).all()
elif case == "deep sparse predict":
    sizes, theta, opt, state, losses = net(30, 20)
    labels = k.sparse_predict_mlp(*csr, 0, sizes, Act.RELU, theta, np.empty(300, np.int64))
    assert labels.min() >= 0 and labels.max() < 10
elif case == "gradient":
    sizes, theta, opt, state, losses = net(30)
    grad = np.empty_like(theta)
    assert np.isfinite(k.mlp_gradient(X, T, idx[0], sizes, Act.RELU, theta, 0.0, grad))
elif case == "predict":
    sizes, theta, opt, state, losses = net(30)
    k.predict_mlp(X, sizes, Act.RELU, theta, np.empty(300, np.int64))
else:
    sizes, theta, opt, state, losses = net(5)
    grad = np.empty_like(theta)
    k.numerical_gradient_mlp((X[:4] / 255).astype(np.float32), T[:4], sizes, Act.RELU, theta, 1e-4, grad)
    assert np.isfinite(grad).all()
print(k._blas_loaded())
"""


@pytest.mark.skipif("cython" not in backend.available_backends(), reason="the Cython extension is not built")
@pytest.mark.parametrize("case", ["affine", "affine_backward", "dense steps", "sparse steps through BLAS",
                                  "deep sparse steps", "deep sparse predict", "gradient", "predict",
                                  "numerical gradient"])
def test_cython_loads_blas_on_first_use(case):
    """The Cython backend loads BLAS (SciPy's cython_blas, 0.02 s) only when a kernel first
    needs it: on a CPU with AVX-512 the sparse path of the chapter-5 experiment never does
    (elsewhere its layers above the first go through BLAS).  Each kernel that multiplies
    through BLAS works as the first such call of a process."""
    out = subprocess.run([sys.executable, "-c", _FIRST_BLAS_CALL, case], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]


_SPIN_AFTER_LOAD = r"""
import os, resource, time, numpy as np
from fastnet.kernels import _cython as k
from fastnet.kernels.contract import Act
time.sleep(0.3)  # NumPy's own OpenBLAS threads spin a while after its import
sizes = np.array([20, 7, 3])
theta, X = np.zeros(20 * 7 + 7 + 7 * 3 + 3, np.float32), np.ones((4, 20), np.float32)
k.mlp_gradient(X, np.zeros(4, np.int64), np.arange(4), sizes, Act.RELU, theta, 0.0,
               np.empty_like(theta))
assert k._blas_loaded()
before = resource.getrusage(resource.RUSAGE_SELF)
time.sleep(0.3)
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"), round(cpu * 1000))
"""


@pytest.mark.skipif("cython" not in backend.available_backends(), reason="the Cython extension is not built")
@pytest.mark.parametrize("setting", [None, "25"], ids=["unset", "the user's"])
def test_blas_threads_sleep_soon_after_loading(setting):
    """SciPy's OpenBLAS, loaded by the first kernel that needs it, has its idle threads
    spin briefly (_blas.spin_briefly), not for a tenth of a second while the kernels'
    own threads want the cores: over 0.3 s of sleep after the load the process spends
    next to no CPU.  The environment is as it was (the user's setting kept, none left
    behind)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if setting is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = setting
    out = subprocess.run([sys.executable, "-c", _SPIN_AFTER_LOAD], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    seen, cpu_ms = out.stdout.split()
    assert seen == str(setting)
    if setting is None:
        assert int(cpu_ms) < 40, f"{cpu_ms} ms of CPU while asleep: BLAS's threads kept spinning"
