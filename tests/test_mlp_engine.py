"""The MLP engine's kernels against the reference backend.

``train_steps_mlp[_sparse]``, ``mlp_gradient``, ``predict_mlp``, ``sparse_predict_mlp``
and ``numerical_gradient_mlp`` of every compiled backend are compared with the
reference (the book's layer-by-layer math in NumPy) for depths 1 to 5, float32 and
float64, dense float rows, uint8 pixels and CSR rows, each optimiser with and without
weight decay, over several steps; backprop is checked against the numerical gradient.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fastnet import backend
from fastnet.kernels.contract import OPT_FIELDS, OPT_ITER, Act, Opt, mlp_size, mlp_views

COMPILED = tuple(b for b in ("numba", "cython") if b in backend.available_backends())
DTYPES = (np.float32, np.float64)
#: parameter tolerance after a few steps (sums in another order; float32 rounds at 6e-8)
TOL = {np.float32: 2e-4, np.float64: 1e-10}
DEPTHS = {1: [30, 6], 2: [30, 9, 6], 3: [30, 12, 9, 6], 5: [30, 11, 10, 9, 8, 6]}
OPTIMIZERS = {"sgd": (Opt.SGD, 0.1), "momentum": (Opt.MOMENTUM, 0.05), "adagrad": (Opt.ADAGRAD, 0.05),
              "adam": (Opt.ADAM, 0.01)}


def _data(dtype, N=80, D=30, C=6, density=0.3, seed=0, pixels=True):
    rng = np.random.default_rng(seed)
    mask = rng.random((N, D)) < density
    mask[::9] = False  # rows without a single non-zero
    X = (rng.integers(1, 256, (N, D)) * mask).astype(np.uint8)
    T = rng.integers(0, C, N).astype(np.int64)
    return (X if pixels else (X / 255).astype(dtype)), T


def _net(sizes, dtype, seed=1, scale=0.3):
    return (scale * np.random.default_rng(seed).standard_normal(mlp_size(sizes))).astype(dtype)


def _opt(kind, lr, decay=0.0):
    return np.array([kind, lr, 0.9, 0.999, decay, 0.0])


def _train(k, sparse, X, T, idx, sizes, act, theta, opt, state):
    """train_steps_mlp of backend module k over X, or train_steps_mlp_sparse over its CSR
    rows; returns (steps run, losses)."""
    losses = np.full(idx.shape[0], np.nan)
    rows = backend.load("numpy").sparse_rows(X) if sparse else (X,)
    steps = k.train_steps_mlp_sparse if sparse else k.train_steps_mlp
    return steps(*rows, T, idx, np.array(sizes), act, theta, opt, state, losses), losses


def _close(got, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(np.asarray(got, np.float64) - expected)))
    assert err <= tol * scale, f"{what}: off by {err:.3g} (tolerance {tol * scale:.3g})"


# ---------------------------------------------------------------- training steps
@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("depth", sorted(DEPTHS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("decay", [0.0, 0.02], ids=["", "decay"])
@pytest.mark.parametrize("rows", ["dense", "pixels", "csr"])
def test_train_steps_parity(backend_name, dtype, depth, optimizer, decay, rows):
    """Four steps of train_steps_mlp (dense rows) or train_steps_mlp_sparse (CSR rows, see
    _train) against the reference's four steps: parameters, losses, the optimiser's state
    and Adam's iteration count."""
    sizes = DEPTHS[depth]
    kind, lr = OPTIMIZERS[optimizer]
    X, T = _data(dtype, pixels=rows != "dense")
    idx = np.random.default_rng(2).integers(0, X.shape[0], (4, 17))
    act = Act.RELU if depth % 2 else Act.SIGMOID
    results = []
    for k in (backend.load("numpy"), backend.load(backend_name)):
        theta, state, opt = _net(sizes, dtype), np.zeros((2, mlp_size(sizes)), dtype), _opt(kind, lr, decay)
        done, losses = _train(k, rows == "csr", X, T, idx, sizes, act, theta, opt, state)
        assert done == 4
        results.append((theta, losses, state, opt))
    (t0, l0, s0, o0), (t1, l1, s1, o1) = results
    assert not np.array_equal(t1, _net(sizes, dtype)), "the parameters did not move"
    _close(t1, t0, dtype, "parameters")
    _close(l1, l0, dtype, "losses")
    _close(s1, s0, dtype, "optimiser state")
    assert o1[OPT_ITER] == o0[OPT_ITER] == (4 if kind == Opt.ADAM else 0)


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("sizes", [[784, 50, 10], [784, 64, 10], [784, 100, 10], [784, 60, 40, 10],
                                   [784, 5, 10], [784, 1, 10], [784, 1024, 10], [784, 256, 130, 10]])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sparse_steps_with_threads(backend_name, dtype, sizes, optimizer, vectors):
    """Batches of 100 MNIST-like rows (enough non-zeros for the threads), on the two-layer
    SGD special cases (the Cython vector top; Numba's padded float32 rows for 49 to 64
    hidden units) and the general sparse engine; against the dense steps of the same
    backend and the reference.  The Cython loops in both builds (``vectors``); 5 hidden
    units pad to a row with a 32-byte vector wholly past them, and split unevenly between
    the dense step's blocks of the first layer's columns (1 unit: one block empty);
    1,024 and 256 units to an
    odd number of 64-byte lines, and both take the first layer in strips of columns
    (fn_padded, fn_strip_vectors in _sparse.h)."""
    rng = np.random.default_rng(5)
    X = (rng.integers(1, 256, (500, 784)) * (rng.random((500, 784)) < 0.19)).astype(np.uint8)
    T = rng.integers(0, 10, 500).astype(np.int64)
    idx = rng.integers(0, 500, (3, 100))
    kind, lr = OPTIMIZERS[optimizer]
    out = []
    for k, sparse in ((backend.load("numpy"), False), (backend.load(backend_name), False),
                      (backend.load(backend_name), True)):
        theta, state, opt = _net(sizes, dtype, scale=0.05), np.zeros((2, mlp_size(sizes)), dtype), _opt(kind, lr)
        assert _train(k, sparse, X, T, idx, sizes, Act.RELU, theta, opt, state)[0] == 3
        out.append(theta)
    _close(out[1], out[0], dtype, "dense steps")
    _close(out[2], out[0], dtype, "sparse steps")


@pytest.mark.skipif("cython" not in COMPILED, reason="the Cython extension is not built")
@pytest.mark.parametrize("sizes", [[784, 17, 33, 10], [784, 40, 1, 16], [784, 64, 100, 100, 10]])
@pytest.mark.parametrize("batch", [2, 7, 11, 100])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sparse_steps_products_without_blas(sizes, batch, optimizer):
    """The layers above the first of a sparse step go to _gemm256.h's product on a CPU
    with AVX2 but not AVX-512 (here forced by _narrow_vectors): row blocks of every
    height it has (a batch's half: 1, 3, 5, 6 and 50 rows), widths that end inside a
    vector of 8, past one, and one unit wide, plain SGD folded into it (alpha, beta 1)
    and the gradients of the others; against the reference, and against the same steps
    with every product through BLAS."""
    from fastnet.kernels import _cython

    rng = np.random.default_rng(7)
    X = (rng.integers(1, 256, (300, 784)) * (rng.random((300, 784)) < 0.19)).astype(np.uint8)
    T = rng.integers(0, sizes[-1], 300).astype(np.int64)
    idx = rng.integers(0, 300, (3, batch))
    kind, lr = OPTIMIZERS[optimizer]
    out = []
    narrow = _cython._narrow_vectors(True)
    try:
        for k, sparse, blas in ((backend.load("numpy"), False, False), (backend.load("cython"), True, False),
                                (backend.load("cython"), True, True)):
            before = _cython._blas_products(blas)
            try:
                theta, state = _net(sizes, np.float32, scale=0.1), np.zeros((2, mlp_size(sizes)), np.float32)
                assert _train(k, sparse, X, T, idx, sizes, Act.RELU, theta, _opt(kind, lr), state)[0] == 3
            finally:
                _cython._blas_products(before)
            out.append(theta)
    finally:
        _cython._narrow_vectors(narrow)
    assert not np.array_equal(out[0], _net(sizes, np.float32, scale=0.1)), "the parameters did not move"
    _close(out[1], out[0], np.float32, "own products")
    _close(out[2], out[0], np.float32, "BLAS products")


@pytest.mark.skipif("cython" not in COMPILED, reason="the Cython extension is not built")
@pytest.mark.parametrize("sizes", [[784, 1, 10], [784, 3, 10], [784, 37, 20, 10]])
@pytest.mark.parametrize("blas", [False, True], ids=["own products", "BLAS"])
def test_dense_steps_first_layer_by_columns(sizes, blas):
    """A dense step of 100 rows (two threads) takes the first layer by two blocks of its
    columns (_dense_step): an empty block (1 unit), uneven ones (3, 37), through
    _gemm256.h's product where the CPU takes it and through BLAS; against the reference."""
    from fastnet.kernels import _cython

    rng = np.random.default_rng(11)
    X = (rng.integers(1, 256, (300, 784)) * (rng.random((300, 784)) < 0.5)).astype(np.uint8)
    T = rng.integers(0, 10, 300).astype(np.int64)
    idx = rng.integers(0, 300, (3, 100))
    out = []
    for k in (backend.load("numpy"), backend.load("cython")):
        before = _cython._blas_products(blas)
        try:
            theta, state = _net(sizes, np.float32, scale=0.05), np.zeros((2, mlp_size(sizes)), np.float32)
            assert _train(k, False, X, T, idx, sizes, Act.RELU, theta, _opt(Opt.SGD, 0.1), state)[0] == 3
        finally:
            _cython._blas_products(before)
        out.append(theta)
    assert not np.array_equal(out[0], _net(sizes, np.float32, scale=0.05)), "the parameters did not move"
    _close(out[1], out[0], np.float32, "dense steps")


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_uint8_pixels_equal_normalised_floats(backend_name, dtype):
    """Dense uint8 rows give exactly the steps of X / 255 in the parameters' dtype."""
    k = backend.load(backend_name)
    pixels, T = _data(dtype)
    floats = pixels.astype(dtype)
    floats /= 255.0
    idx = np.random.default_rng(3).integers(0, pixels.shape[0], (3, 10))
    runs = []
    for X in (pixels, floats):
        theta, state = _net(DEPTHS[3], dtype), np.zeros((2, mlp_size(DEPTHS[3])), dtype)
        runs.append((theta, _train(k, False, X, T, idx, DEPTHS[3], Act.RELU, theta, _opt(Opt.ADAM, 0.01), state)[1]))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_optimisers_flush_subnormals_and_leave_the_thread_as_it_was(backend_name, sparse):
    """The optimisers' loops flush subnormal numbers to zero (Adam's state decays into
    them where a pixel is 0, and they are slow), and put the calling thread's float
    settings back after: subnormals computed here afterwards are still subnormal."""
    k = backend.load(backend_name)
    sizes = np.array(DEPTHS[2])
    X, T = _data(np.float32)
    theta = _net(sizes, np.float32)
    state = np.zeros((2, theta.size), np.float32)
    state[1, :] = np.float32(1e-39)  # a subnormal second moment everywhere
    idx = np.random.default_rng(3).integers(0, len(X), (2, 20))
    _train(k, sparse, X, T, idx, sizes, Act.RELU, theta, _opt(Opt.ADAM, 0.001), state)
    tiny = np.finfo(np.float32).tiny
    assert not np.any((state != 0) & (np.abs(state) < tiny))  # flushed, not carried on
    assert np.float32(1e-38) / np.float32(10) != 0  # this thread's settings are back


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_many_steps_equal_single_steps(backend_name, sparse):
    """One call over idx (S, B) gives what S calls of one step give (the same code per
    step: identical bits), Adam's iteration count included."""
    k = backend.load(backend_name)
    X, T = _data(np.float32)
    idx = np.random.default_rng(4).integers(0, X.shape[0], (5, 12))
    sizes = DEPTHS[2]
    for kind, lr in OPTIMIZERS.values():
        theta, state, opt = _net(sizes, np.float32), np.zeros((2, mlp_size(sizes)), np.float32), _opt(kind, lr)
        _, losses = _train(k, sparse, X, T, idx, sizes, Act.RELU, theta, opt, state)
        theta1, state1, opt1 = _net(sizes, np.float32), np.zeros_like(state), _opt(kind, lr)
        single = [_train(k, sparse, X, T, idx[s : s + 1], sizes, Act.RELU, theta1, opt1, state1)[1][0]
                  for s in range(5)]
        np.testing.assert_array_equal(losses, single)
        np.testing.assert_array_equal(theta, theta1)
        np.testing.assert_array_equal(opt, opt1)


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_divergence_stops_after_the_step(backend_name, sparse):
    """A loss that is not finite ends the call after its step; what ran is kept (the
    padded copies of the special cases are copied back on that path too)."""
    k = backend.load(backend_name)
    X, T = _data(np.float32)
    idx = np.random.default_rng(4).integers(0, X.shape[0], (5, 12))
    for sizes in ([30, 50, 6], DEPTHS[3]):
        theta = _net(sizes, np.float32)
        theta[-1] = np.inf  # the last bias: every loss is inf
        state = np.zeros((2, theta.size), np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            done, losses = _train(k, sparse, X, T, idx, sizes, Act.RELU, theta, _opt(Opt.SGD, 0.1), state)
        assert done == 1 and not np.isfinite(losses[0])
        assert not np.array_equal(theta[:30], _net(sizes, np.float32)[:30]), "W1 was not copied back"


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
def test_bad_arguments_are_refused(backend_name):
    """Every check is shared by the three backends (kernels/_checks.py) and runs before
    any step, so the parameters stay as they were."""
    k = backend.load(backend_name)
    X, T = _data(np.float64)
    sizes = np.array(DEPTHS[2])
    theta = _net(sizes, np.float64)
    before = theta.copy()
    idx = np.random.default_rng(4).integers(0, X.shape[0], (3, 10))
    state, losses = np.zeros((2, theta.size)), np.empty(3)
    csr = backend.load("numpy").sparse_rows(X)

    def steps(**change):
        a = dict(X=X, T=T, idx=idx, sizes=sizes, act=1, theta=theta, opt=_opt(Opt.SGD, 0.1), state=state,
                 losses=losses)
        a.update(change)
        return k.train_steps_mlp(*a.values())

    late = idx.copy()
    late[-1, -1] = 10**6
    cases = [
        (IndexError, r"batch index 1000000 is out of range for 80 rows", dict(idx=late)),
        (ValueError, "label 99 at index", dict(T=np.where(np.arange(80) == idx[2, 0], 99, T))),
        (ValueError, r"theta has shape \(\d+,\); layers \[30, 9, 6\] need", dict(theta=theta[:-1])),
        (ValueError, r"X has shape \(80, 29\) but the first layer takes 30 inputs", dict(X=X[:, :29].copy())),
        (TypeError, "X is float32; it must be uint8 pixels or theta's float64", dict(X=X.astype(np.float32))),
        (TypeError, r"state is float32; expected float64", dict(state=state.astype(np.float32))),
        (ValueError, "act must be", dict(act=3)),
        (ValueError, "lr > 0", dict(opt=_opt(Opt.SGD, 0.0))),
        (ValueError, "optimiser code", dict(opt=_opt(7, 0.1))),
        (ValueError, "finite", dict(opt=_opt(Opt.SGD, np.nan))),
        (TypeError, f"{OPT_FIELDS} fields", dict(opt=np.array([1.0, 0.1]))),
        (ValueError, r"idx must be a non-empty 2-D array \(steps, batch\)", dict(idx=idx[0])),
        (ValueError, "losses must be", dict(losses=np.empty(4))),
        (ValueError, "sizes must list", dict(sizes=np.array([30]))),
        (ValueError, "sizes must list", dict(sizes=np.array([30, 0, 6]))),
    ]
    for error, message, change in cases:
        with pytest.raises(error, match=message):
            steps(**change)
    bad = csr[1].copy()
    bad[csr[0][idx[0, 0]]] = 30  # a column the weights do not have, in the first batch
    with pytest.raises(ValueError, match="column ind"):
        k.train_steps_mlp_sparse(csr[0], bad, csr[2], T, idx[:1], sizes, 1, theta.copy(), _opt(Opt.SGD, 0.1),
                                 state, losses[:1])
    broken = csr[0].copy()
    broken[idx[0, 0] + 1] = broken[-1] + 5
    with pytest.raises(ValueError, match="indptr"):
        k.train_steps_mlp_sparse(broken, csr[1], csr[2], T, idx, sizes, 1, theta, _opt(Opt.SGD, 0.1), state, losses)
    with pytest.raises(TypeError, match="data"):
        k.train_steps_mlp_sparse(csr[0], csr[1], csr[2].astype(np.float32), T, idx, sizes, 1, theta,
                                 _opt(Opt.SGD, 0.1), state, losses)
    np.testing.assert_array_equal(theta, before)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("depth", sorted(DEPTHS))
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_mlp_gradient_parity(backend_name, dtype, depth, decay):
    sizes = np.array(DEPTHS[depth])
    X, T = _data(dtype)
    idx = np.arange(5, 45)
    theta = _net(sizes, dtype)
    g0, g1 = np.full(theta.size, np.nan, dtype), np.full(theta.size, np.nan, dtype)
    act = Act.SIGMOID if depth == 2 else Act.RELU
    l0 = backend.load("numpy").mlp_gradient(X, T, idx, sizes, act, theta, decay, g0)
    l1 = backend.load(backend_name).mlp_gradient(X, T, idx, sizes, act, theta, decay, g1)
    _close(l1, l0, dtype, "loss")
    _close(g1, g0, dtype, "gradient")
    np.testing.assert_array_equal(theta, _net(sizes, dtype))


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_mlp_gradient_of_rows_in_order_reads_them_in_place(backend_name, dtype):
    """A batch that is X's rows in order (a net's gradient of the x it is given), or its
    first rows in order, is read where it lies; the gradient is the same, bit for bit,
    as that of the same rows gathered from elsewhere, and X is left as it was."""
    k = backend.load(backend_name)
    sizes = np.array(DEPTHS[3])
    X, T = _data(dtype, pixels=False)
    theta = _net(sizes, dtype)
    idx = np.arange(7, 47)
    batch, labels = X[idx].copy(), T[idx].copy()
    batch.flags.writeable = False  # read, never written: a read-only array will do
    g0, g1 = np.empty_like(theta), np.empty_like(theta)
    l0 = k.mlp_gradient(X, T, idx, sizes, Act.RELU, theta, 0.01, g0)
    l1 = k.mlp_gradient(batch, labels, np.arange(40), sizes, Act.RELU, theta, 0.01, g1)
    assert l1 == l0
    np.testing.assert_array_equal(g1, g0)
    np.testing.assert_array_equal(batch, X[idx])
    # the first rows of a longer X, in order
    l2 = k.mlp_gradient(X[7:], T[7:], np.arange(40), sizes, Act.RELU, theta, 0.01, g1)
    assert l2 == l0
    np.testing.assert_array_equal(g1, g0)


# ---------------------------------------------------------------- mlp_gradient over the non-zeros
def _cython_module():
    if "cython" not in COMPILED:
        pytest.skip("the Cython extension is not built")
    from fastnet.kernels import _cython

    return _cython


def _nonzeros_or_skip():
    """The Cython module, where this CPU runs its first layer over the non-zeros."""
    c = _cython_module()
    if not c.NZ_READY:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: mlp_gradient keeps the dense products")
    return c


def _mnist_like(N=100, D=784, density=0.19, seed=3, pixels=False):
    """Rows of D inputs in [0, 1], about `density` of them non-zero, some rows all zero and
    one all non-zero (a row longer than most)."""
    rng = np.random.default_rng(seed)
    X = ((rng.random((N, D)) < density) * rng.integers(1, 256, (N, D))).astype(np.uint8)
    X[5] = 0
    X[7] = rng.integers(1, 256, D)
    T = rng.integers(0, 10, N).astype(np.int64)
    return (X if pixels else (X / 255).astype(np.float32)), T


def _gradients(c, X, T, idx, sizes, act, theta, decay, dense=False, monkeypatch=None):
    g = np.full(theta.size, np.nan, theta.dtype)
    if dense:
        monkeypatch.setattr(c, "NZ_MAX_DENSITY", 0.0)
    loss = c.mlp_gradient(X, T, idx, sizes, act, theta, decay, g)
    if dense:
        monkeypatch.undo()
    return loss, g


@pytest.mark.parametrize("hidden", [[32], [50], [64], [100], [130], [50, 40], [100, 64, 32]],
                         ids=lambda h: "-".join(map(str, h)))
@pytest.mark.parametrize("D", [784, 37])
@pytest.mark.parametrize("decay", [0.0, 0.05], ids=["", "decay"])
@pytest.mark.parametrize("act", [Act.RELU, Act.SIGMOID], ids=["relu", "sigmoid"])
def test_mlp_gradient_over_the_nonzeros(hidden, D, decay, act, vectors, monkeypatch):
    """float32 rows with few non-zeros: the first layer over its non-zeros (one tile of 64
    units or several, a partial last vector, inputs not a multiple of 16), in the AVX-512
    and the AVX2 build, equals the reference's gradient and the dense products' within
    float32 rounding, and is not the dense products' bit for bit (so the path ran)."""
    c = _nonzeros_or_skip()
    sizes = np.array([D, *hidden, 10])
    X, T = _mnist_like(D=D)
    theta = _net(sizes, np.float32, scale=0.1)
    idx = np.arange(X.shape[0])
    l_ref, g_ref = 0.0, np.empty_like(theta)
    l_ref = backend.load("numpy").mlp_gradient(X, T, idx, sizes, act, theta, decay, g_ref)
    loss, g = _gradients(c, X, T, idx, sizes, act, theta, decay)
    l_dense, g_dense = _gradients(c, X, T, idx, sizes, act, theta, decay, dense=True, monkeypatch=monkeypatch)
    _close(loss, l_ref, np.float32, "loss")
    _close(g, g_ref, np.float32, "gradient")
    _close(g, g_dense.astype(np.float64), np.float32, "gradient against the dense products")
    assert not np.array_equal(g, g_dense)
    np.testing.assert_array_equal(theta, _net(sizes, np.float32, scale=0.1))


def test_mlp_gradient_over_the_nonzeros_of_gathered_rows(vectors, monkeypatch):
    """uint8 pixels and float rows gathered by idx (out of order, repeated) take the same
    path and give what the same rows in order give, bit for bit."""
    c = _nonzeros_or_skip()
    sizes = np.array([784, 50, 10])
    theta = _net(sizes, np.float32, scale=0.1)
    U, T = _mnist_like(N=300, pixels=True)
    idx = np.array([250, 3, 3, 99, 5, 12] * 20)
    batch = (U[idx] / 255).astype(np.float32)
    l0, g0 = _gradients(c, batch, T[idx], np.arange(idx.size), sizes, Act.RELU, theta, 0.01)
    for X in (U, (U / 255).astype(np.float32)):
        l1, g1 = _gradients(c, X, T, idx, sizes, Act.RELU, theta, 0.01)
        assert l1 == l0
        np.testing.assert_array_equal(g1, g0)
    l2, g2 = _gradients(c, batch, T[idx], np.arange(idx.size), sizes, Act.RELU, theta, 0.01, dense=True,
                        monkeypatch=monkeypatch)
    assert not np.array_equal(g0, g2)


@pytest.mark.parametrize("case", ["dense batch", "narrow layer", "many outputs", "float64", "inf in W1",
                                  "nan in X", "inf in X", "diverged"])
def test_mlp_gradient_keeps_the_dense_products(case, monkeypatch):
    """Where the non-zeros would not be faster (over NZ_MAX_DENSITY of the inputs non-zero,
    fewer than NZ_MIN_UNITS units, more than NZ_MAX_OUTPUTS outputs, float64), and where a
    value that is not finite must spread as through the dense products (0 * inf is NaN):
    the result is the dense products' bit for bit, NaN in the same places."""
    c = _cython_module()
    hidden, N, density, dtype = 50, 100, 0.19, np.float32
    if case == "dense batch":
        density = c.NZ_MAX_DENSITY + 0.05
    elif case == "narrow layer":
        hidden = c.NZ_MIN_UNITS - 1
    elif case == "many outputs":
        N = c.NZ_MAX_OUTPUTS // hidden + 1
    elif case == "float64":
        dtype = np.float64
    sizes = np.array([784, hidden, 10])
    X, T = _mnist_like(N=N, density=density)
    X = X.astype(dtype)
    theta = _net(sizes, dtype, scale=0.1)
    if case == "inf in W1":
        theta[784 * 3 + 4] = np.inf  # W1[3, 4]: pixel 3 is 0 in most rows
        X[:, 3] = 0
    elif case == "nan in X":
        X[11, 200] = np.nan
    elif case == "inf in X":
        X[11, 200] = np.inf
    elif case == "diverged":
        theta *= 1e30  # logits overflow: the loss is inf or NaN
    idx = np.arange(N)
    loss, g = _gradients(c, X, T, idx, sizes, Act.RELU, theta, 0.0)
    l_dense, g_dense = _gradients(c, X, T, idx, sizes, Act.RELU, theta, 0.0, dense=True, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(g, g_dense)
    assert loss == l_dense or (np.isnan(loss) and np.isnan(l_dense))
    if case in ("inf in W1", "nan in X", "inf in X", "diverged"):
        assert not np.isfinite(loss)


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
@pytest.mark.parametrize("depth", [1, 2, 5])
def test_backprop_equals_the_numerical_gradient(backend_name, depth):
    """float64: mlp_gradient (+ lambda W) against numerical_gradient_mlp (+ lambda W, the
    central difference of the decay term), both of the same backend."""
    k = backend.load(backend_name)
    sizes = np.array(DEPTHS[depth])
    X, T = _data(np.float64, pixels=False)
    x, t = X[:12], T[:12]
    theta = _net(sizes, np.float64)
    backprop, numeric = np.empty_like(theta), np.empty_like(theta)
    k.mlp_gradient(x, t, np.arange(12), sizes, Act.RELU, theta, 0.0, backprop)
    k.numerical_gradient_mlp(x, t, sizes, Act.RELU, theta, 1e-4, numeric)
    np.testing.assert_allclose(backprop, numeric, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("depth", sorted(DEPTHS))
@pytest.mark.parametrize("act", [Act.RELU, Act.SIGMOID])
def test_numerical_gradient_parity(backend_name, depth, act):
    """float64: equal to the book-style loop (the reference) within 1e-8; float32: the
    compiled kernel sums in float64, so it is compared with the reference run in float64
    on the same weights (within what moving a float32 weight by h can round)."""
    sizes = np.array(DEPTHS[depth])
    X, T = _data(np.float64, N=9, pixels=False)
    theta = _net(sizes, np.float64)
    expected, got = np.empty_like(theta), np.empty_like(theta)
    backend.load("numpy").numerical_gradient_mlp(X, T, sizes, act, theta, 1e-4, expected)
    backend.load(backend_name).numerical_gradient_mlp(X, T, sizes, act, theta, 1e-4, got)
    np.testing.assert_allclose(got, expected, atol=1e-8, rtol=0)
    theta32, got32 = theta.astype(np.float32), np.empty(theta.size, np.float32)
    backend.load("numpy").numerical_gradient_mlp(X, T, sizes, act, theta32.astype(np.float64), 1e-4, expected)
    backend.load(backend_name).numerical_gradient_mlp(X.astype(np.float32), T, sizes, act, theta32, 1e-4, got32)
    np.testing.assert_allclose(got32, expected, atol=2e-4, rtol=2e-2)


# ---------------------------------------------------------------- evaluation
def _decided_rows(pixels, sizes, theta):
    """The rows whose two best scores (ReLU net, in float64) are more than 1e-3 apart, so
    that the order of a sum cannot change their label; most rows must be."""
    scores = pixels / 255.0
    views = mlp_views(sizes, theta.astype(np.float64))
    for i, (W, b) in enumerate(views):
        scores = scores @ W + b
        if i < len(views) - 1:
            scores = np.maximum(scores, 0)
    best = np.sort(scores, axis=1)
    clear = best[:, -1] - best[:, -2] > 1e-3
    assert clear.mean() > 0.9
    return clear


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("hidden", [[50], [1024], [256, 128]])
def test_predict_first_layer_in_strips(backend_name, dtype, hidden, vectors):
    """First layers of 784 inputs, which the Cython evaluation reads in strips of columns
    (fn_strip_vectors in _sparse.h): 50 units with the split layout's tail lanes in the
    last strip (32-byte vectors), 1,024 and 256 units whose padded rows get an extra
    64-byte line (fn_padded).  The labels of pixel and CSR rows against the reference's,
    where the two best scores are far enough apart for the order of a sum not to decide."""
    sizes = np.array([784, *hidden, 10])
    ref, k = backend.load("numpy"), backend.load(backend_name)
    rng = np.random.default_rng(3)
    pixels = (rng.integers(1, 256, (300, 784)) * (rng.random((300, 784)) < 0.19)).astype(np.uint8)
    theta = _net(sizes, dtype, scale=0.05)
    clear = _decided_rows(pixels, sizes, theta)
    expected = ref.predict_mlp(pixels, sizes, Act.RELU, theta, np.empty(300, np.int64))
    for got in (k.predict_mlp(pixels, sizes, Act.RELU, theta, np.full(300, -1, np.int64)),
                k.sparse_predict_mlp(*ref.sparse_rows(pixels), 0, sizes, Act.RELU, theta,
                                     np.full(300, -1, np.int64))):
        np.testing.assert_array_equal(got[clear], expected[clear])


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_predict_parity(backend_name, dtype, depth, vectors):
    """Labels of 700 rows (several blocks, a partial last one), dense floats, pixels and
    CSR rows from an offset, against the reference; rows whose two best scores are too
    close for the order of a sum to decide are left out.  The Cython loops in both
    builds (``vectors``)."""
    sizes = np.array(DEPTHS[depth])
    ref, k = backend.load("numpy"), backend.load(backend_name)
    pixels, _ = _data(dtype, N=700)
    theta = _net(sizes, dtype, scale=1.0)
    expected = ref.predict_mlp(pixels, sizes, Act.RELU, theta, np.empty(700, np.int64))
    clear = _decided_rows(pixels, sizes, theta)
    floats = (pixels / 255).astype(dtype)
    csr = ref.sparse_rows(pixels)
    for got in (k.predict_mlp(pixels, sizes, Act.RELU, theta, np.full(700, -1, np.int64)),
                k.predict_mlp(floats, sizes, Act.RELU, theta, np.full(700, -1, np.int64)),
                k.sparse_predict_mlp(*csr, 0, sizes, Act.RELU, theta, np.full(700, -1, np.int64))):
        np.testing.assert_array_equal(got[clear], expected[clear])
    part = k.sparse_predict_mlp(*csr, 13, sizes, Act.RELU, theta, np.full(300, -1, np.int64))
    np.testing.assert_array_equal(part[clear[13:313]], expected[13:313][clear[13:313]])


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
def test_predict_ties_nan_and_bad_input(backend_name):
    """numpy.argmax's rules: the first of equal maxima, the first NaN when a score is NaN."""
    k = backend.load(backend_name)
    X = np.zeros((9, 4), np.uint8)
    X[:, 0] = 255
    csr = backend.load("numpy").sparse_rows(X)
    sizes = np.array([4, 3, 5])
    for b2, label in (([0, 2, 2, 1, 2], 1), ([3, 3, 3, 3, 3], 0), ([0, 1, np.nan, 5, np.nan], 2),
                      ([np.nan, 9, 9, 9, 9], 0), ([-np.inf, -np.inf, -1, 7, np.inf], 4)):
        theta = np.zeros(mlp_size(sizes), np.float32)
        theta[-5:] = b2
        for out in (k.predict_mlp(X, sizes, 1, theta, np.empty(9, np.int64)),
                    k.sparse_predict_mlp(*csr, 0, sizes, 1, theta, np.empty(9, np.int64))):
            np.testing.assert_array_equal(out, label, err_msg=str(b2))
    theta = np.zeros(mlp_size(sizes), np.float32)
    with pytest.raises(TypeError, match="int64"):
        k.predict_mlp(X, sizes, 1, theta, np.empty(9, np.int32))
    with pytest.raises(ValueError, match=r"out has shape \(8,\), expected \(9,\)"):
        k.predict_mlp(X, sizes, 1, theta, np.empty(8, np.int64))
    with pytest.raises(IndexError, match="rows 5:14 are out of range for 9 CSR rows"):
        k.sparse_predict_mlp(*csr, 5, sizes, 1, theta, np.empty(9, np.int64))
    bad = csr[1].copy()
    bad[0] = 4
    with pytest.raises(ValueError, match="column ind"):
        k.sparse_predict_mlp(csr[0], bad, csr[2], 0, sizes, 1, theta, np.empty(9, np.int64))


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize("backend_name", COMPILED)
def test_sparse_kernels_from_several_threads(backend_name):
    """The kernels release the GIL: calls from several Python threads at once give what
    the same calls give one after another."""
    from concurrent.futures import ThreadPoolExecutor

    k = backend.load(backend_name)
    rng = np.random.default_rng(6)
    X = (rng.integers(1, 256, (400, 300)) * (rng.random((400, 300)) < 0.2)).astype(np.uint8)
    T = rng.integers(0, 10, 400).astype(np.int64)
    csr = k.sparse_rows(X)
    cases = [([300, H, 10], kind) for H, kind in ((50, Opt.SGD), (17, Opt.SGD), (64, Opt.MOMENTUM), (20, Opt.ADAM))]

    def run(case):
        sizes, kind = case
        theta, state, opt = _net(sizes, np.float32, scale=0.05), np.zeros((2, mlp_size(sizes)), np.float32), \
            _opt(kind, 0.01)
        idx = np.random.default_rng(1).integers(0, 400, (8, 50))
        labels = np.empty(400, np.int64)
        for _ in range(3):
            k.train_steps_mlp_sparse(*csr, T, idx, np.array(sizes), 1, theta, opt, state, np.empty(8))
            k.sparse_predict_mlp(*csr, 0, np.array(sizes), 1, theta, labels)
        return theta, labels

    serial = [run(c) for c in cases]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, cases * 3))
    for i, got in enumerate(threaded):
        for a, b in zip(got, serial[i % len(cases)]):
            np.testing.assert_array_equal(a, b)


_THREADS_SCRIPT = """
import sys, numpy as np
from fastnet import backend
from fastnet.kernels.contract import mlp_size
k = backend.load(sys.argv[2])
rng = np.random.default_rng(3)
X = (rng.integers(1, 256, (400, 300)) * (rng.random((400, 300)) < 0.2)).astype(np.uint8)
if sys.argv[1] == "lopsided":  # every non-zero in the second block of pixels: its thread is the slow one
    X[:, :150] = 0
    X[:, 150:] |= (rng.random((400, 150)) < 0.3).astype(np.uint8)
T = rng.integers(0, 10, 400)
csr = k.sparse_rows(X)
out = []
# SGD (added into W1 by the scatter), Adam, Momentum with weight decay (W1's step on the threads of the scatter)
for sizes, kind, decay in (([300, 50, 10], 1, 0), ([300, 40, 30, 10], 1, 0), ([300, 50, 10], 4, 0),
                           ([300, 40, 30, 10], 2, 0.01)):
    sizes = np.array(sizes)
    theta = (0.1 * rng.standard_normal(mlp_size(sizes))).astype(np.float32)
    state, losses = np.zeros((2, theta.size), np.float32), np.empty(20)
    k.train_steps_mlp_sparse(*csr, T, rng.integers(0, 400, (20, 100)), sizes, 1, theta,
                             np.array([kind, 0.05, 0.9, 0.999, decay, 0]), state, losses)
    labels = k.sparse_predict_mlp(*csr, 0, sizes, 1, theta, np.empty(400, np.int64))
    out += [theta, losses, labels]
sys.stdout.write("".join(a.tobytes().hex() for a in out))
"""


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("pixels", ["even", "lopsided"])
def test_sparse_results_do_not_depend_on_the_thread_count(backend_name, pixels):
    """The sparse kernels split blocks of pixels (rows of W1) and blocks of rows between
    threads so that no sum changes order with their number: 1, 2 or 3 threads, the same
    bits.  Lopsided: all the work of the forward on one thread, so that a phase that does
    not wait for the other thread's sums reads them unfinished."""
    outs = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, pixels, backend_name], capture_output=True,
                             text=True, env=env)
        assert run.returncode == 0, run.stderr
        outs.append(run.stdout)
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 1000


@pytest.mark.skipif("cython" not in COMPILED, reason="the Cython extension is not built")
def test_cython_codes_are_the_contracts():
    """The activation and optimiser codes and the opt record's fields compiled into the
    Cython module are those of kernels/contract.py (their one home on the Python side)."""
    from fastnet.kernels import _cython, contract

    codes = _cython._codes()
    assert codes["Act"] == {a.name: int(a) for a in Act}
    assert codes["Opt"] == {o.name: int(o) for o in Opt}
    fields = [contract.OPT_KIND, contract.OPT_LR, contract.OPT_BETA1, contract.OPT_BETA2, contract.OPT_DECAY,
              contract.OPT_ITER]
    assert codes["fields"] == fields == list(range(OPT_FIELDS))
