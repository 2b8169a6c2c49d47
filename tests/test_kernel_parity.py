"""Every kernel of every compiled backend against the NumPy reference.

float32 and float64, batch sizes 1, 2 and 100, odd widths, logits of +-1000, integer
and one-hot labels, strided (non-contiguous) inputs; then random shapes and values
from hypothesis.  Tolerances per dtype are written once, in ``TOL``.
"""

import re
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnet import backend
from fastnet.kernels import contract

#: rtol, and atol as a fraction of the largest expected magnitude (sums of hundreds of
#: products cancel: their rounding error scales with the terms, not with the result)
TOL = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
    np.dtype(np.float64): dict(rtol=1e-11, atol=1e-13),
}


def _close(got, expected, dtype, msg, terms=0.0):
    """``terms``: the largest sum of |products| behind an element (sums of products whose
    rounding error scales with the terms, not with the result)."""
    tol = TOL[np.dtype(dtype)]
    finite = np.abs(np.asarray(expected, dtype=float))
    finite = finite[np.isfinite(finite)]
    scale = max(1.0, float(finite.max()) if finite.size else 1.0, terms)
    np.testing.assert_allclose(got, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=msg)


#: the rounding error of a product x @ W + b, in units of the dtype's unit roundoff times
#: |x| @ |W| + |b| (BLAS and the compiled loops were measured at under 2 here)
PRODUCT_ERROR = 8


def _close_after_product(got, expected, x, W, b, act, dtype, msg):
    """Outputs of ``act(x @ W + b)`` (act 0 identity, 1 relu, 2 sigmoid), each within what
    the product's rounding error can do to it: identity and relu move by at most that
    error, a sigmoid by its own change over [z - error, z + error] (next to nothing where
    it is saturated); plus a few units in the last place for the activation itself."""
    u = np.finfo(dtype).eps / 2
    x, W, b = (np.asarray(a, dtype=float) for a in (x, W, b))
    z = x @ W + b
    error = PRODUCT_ERROR * u * (np.abs(x) @ np.abs(W) + np.abs(b))
    if act == 2:
        from scipy.special import expit as sigmoid  # accurate in float64 to the far tails

        error = np.maximum(sigmoid(z + error) - sigmoid(z), sigmoid(z) - sigmoid(z - error))
    expected = np.asarray(expected, dtype=float)
    allowed = error + 4 * u * np.abs(expected) + np.finfo(dtype).tiny
    off = np.abs(np.asarray(got, dtype=float) - expected)
    bad = ~(off <= allowed) & ~(np.isnan(got) & np.isnan(expected))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{msg}: {int(bad.sum())} outputs off; at {i} got {got[i]!r}, expected "
                             f"{expected[i]!r}, allowed {allowed[i]:.3g}")


COMPILED = ("numba", "cython")
BACKENDS = ("numpy", *COMPILED)
#: whole-net kernels with parity tests of their own (below, and test_numerical_gradient.py)
WHOLE_NET = {"train_steps_mlp", "train_steps_mlp_sparse", "mlp_gradient", "predict_mlp", "sparse_predict_mlp",
             "numerical_gradient_mlp"}
#: kernels over CSR rows, with parity tests of their own (below)
SPARSE = {"sparse_rows", "sparse_affine"}
ELEMENTARY = [k for k in contract.KERNELS if k not in WHOLE_NET | SPARSE]
DTYPES = (np.float32, np.float64)


def _strided(a, rng):
    """The same values as ``a`` in a non-contiguous view (every other column of a wider array)."""
    if a.ndim == 1:
        big = np.zeros(2 * a.shape[0], a.dtype)
        big[::2] = a
        return big[::2]
    big = rng.standard_normal((a.shape[0], 2 * a.shape[1])).astype(a.dtype)
    big[:, ::2] = a
    return big[:, ::2]


def make_case(name, n, d, m, dtype, rng, scale=3.0, strided=False):
    """Inputs for kernel ``name``: (args, indices of the output arguments)."""
    dtype = np.dtype(dtype)

    def arr(*shape, s=scale):
        a = (s * rng.standard_normal(shape)).astype(dtype)
        return _strided(a, rng) if strided else a

    def empty(*shape):
        return np.full(shape, np.nan, dtype)

    labels = rng.integers(0, m, n).astype(np.int64)
    onehot = np.eye(m, dtype=dtype)[labels]
    probs = np.abs(rng.standard_normal((n, m))).astype(dtype) + dtype.type(0.01)
    probs /= probs.sum(axis=1, keepdims=True)
    if strided:  # every input of the loss kernels too, labels included
        labels, onehot, probs = (_strided(a, rng) for a in (labels, onehot, probs))
    cases = {
        "step": lambda: ((arr(n, d), empty(n, d)), (1,)),
        "sigmoid": lambda: ((arr(n, d), empty(n, d)), (1,)),
        "relu": lambda: ((arr(n, d), empty(n, d)), (1,)),
        "sigmoid_backward": lambda: ((arr(n, d), np.abs(arr(n, d)) % 1, empty(n, d)), (2,)),
        "relu_backward": lambda: ((arr(n, d), arr(n, d), empty(n, d)), (2,)),
        "affine": lambda: ((arr(n, d), arr(d, m), arr(m), empty(n, m)), (3,)),
        "affine_relu": lambda: ((arr(n, d), arr(d, m), arr(m), empty(n, m)), (3,)),
        "affine_sigmoid": lambda: ((arr(n, d), arr(d, m), arr(m), empty(n, m)), (3,)),
        "affine_backward": lambda: (
            (arr(n, d), arr(d, m), arr(n, m), empty(d, m), empty(m), empty(n, d)),
            (3, 4, 5),
        ),
        "softmax": lambda: ((arr(n, m), empty(n, m)), (1,)),
        "cross_entropy_labels": lambda: ((probs, labels), ()),
        "cross_entropy_onehot": lambda: ((probs, onehot), ()),
        "sum_squared_error": lambda: ((arr(n, m), arr(n, m)), ()),
        "softmax_loss_labels": lambda: ((arr(n, m), labels, empty(n, m)), (2,)),
        "softmax_loss_onehot": lambda: ((arr(n, m), onehot, empty(n, m)), (2,)),
        "softmax_loss_backward_labels": lambda: ((probs, labels, 1.5, empty(n, m)), (3,)),
        "softmax_loss_backward_onehot": lambda: ((probs, onehot, 0.5, empty(n, m)), (3,)),
    }
    return cases[name]()


def run_both(name, backend_name, args, outs, dtype):
    """Run the reference and ``backend_name`` on copies of ``args``; compare results."""
    ref_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    got_args = [a.copy() if isinstance(a, np.ndarray) and i in outs else a for i, a in enumerate(args)]
    expected = getattr(backend.load("numpy"), name)(*ref_args)
    got = getattr(backend.load(backend_name), name)(*got_args)
    if not outs or name.startswith("softmax_loss_") and "backward" not in name:
        _close(got, expected, dtype, f"{backend_name}.{name} result")
    for i in outs:
        assert got_args[i].dtype == np.dtype(dtype)
        if name in AFFINE_ACT:
            _close_after_product(got_args[i], ref_args[i], *args[:3], AFFINE_ACT[name], dtype,
                                 f"{backend_name}.{name}")
        else:
            _close(got_args[i], ref_args[i], dtype, f"{backend_name}.{name} arg {i}")


AFFINE_ACT = {"affine": 0, "affine_relu": 1, "affine_sigmoid": 2}


SIZES = [(1, 1, 1), (1, 784, 10), (2, 7, 3), (100, 784, 50), (100, 50, 10), (13, 31, 17)]


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ELEMENTARY)
def test_parity_sizes(backend_name, dtype, name):
    # a seed that is the same in every process (str hashes are randomised per process)
    rng = np.random.default_rng(zlib.crc32(f"{name}-{np.dtype(dtype).name}".encode()))
    for n, d, m in SIZES:
        for strided in (False, True):
            args, outs = make_case(name, n, d, m, dtype, rng, strided=strided)
            run_both(name, backend_name, args, outs, dtype)


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["affine_sigmoid", "affine_relu", "softmax_loss_labels"])
def test_parity_unsaturated(backend_name, dtype, name):
    """Inputs small enough that no sigmoid saturates (the sizes above push most of them
    to 0 or 1, where an output that is off by a little would still pass)."""
    args, outs = make_case(name, 100, 784, 50, dtype, np.random.default_rng(11), scale=0.05)
    run_both(name, backend_name, args, outs, dtype)


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "name", ["softmax", "softmax_loss_labels", "softmax_loss_onehot", "sigmoid", "affine_sigmoid"]
)
def test_parity_huge_logits(backend_name, dtype, name):
    rng = np.random.default_rng(7)
    args, outs = make_case(name, 5, 4, 10, dtype, rng, scale=1000.0)
    run_both(name, backend_name, args, outs, dtype)


@pytest.mark.parametrize("backend_name", COMPILED)
def test_mixed_dtypes_refused(backend_name):
    k = backend.load(backend_name)
    x = np.ones((2, 3), np.float32)
    W = np.ones((3, 4), np.float64)
    with pytest.raises(TypeError, match="float"):
        k.affine(x, W, np.ones(4, np.float32), np.empty((2, 4), np.float32))
    with pytest.raises(TypeError, match="out is float64"):
        k.relu(x, np.empty((2, 3), np.float64))
    with pytest.raises(TypeError, match="x must be float32 or float64, got int64"):
        k.relu(np.ones((2, 3), np.int64), np.empty((2, 3), np.int64))


@pytest.mark.parametrize("backend_name", COMPILED)
def test_shape_errors_name_both_shapes(backend_name):
    k = backend.load(backend_name)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        k.affine(np.ones((2, 3)), np.ones((4, 5)), np.ones(5), np.empty((2, 5)))
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        k.relu(np.ones((2, 3)), np.empty((2, 6)))
    with pytest.raises(ValueError, match="C-contiguous"):
        k.relu(np.ones((2, 3)), np.empty((3, 2)).T)


LABEL_KERNELS = {
    "cross_entropy_labels": lambda y, t: (y, t),
    "softmax_loss_labels": lambda y, t: (y, t, np.full_like(y, np.nan)),
    "softmax_loss_backward_labels": lambda y, t: (y, t, 1.0, np.full_like(y, np.nan)),
}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", sorted(LABEL_KERNELS))
@pytest.mark.parametrize("bad", [2**40, -(2**40), 10**12, 10, 11, -1])
@pytest.mark.parametrize("row", [0, 4])
def test_labels_out_of_range_are_refused(backend_name, name, bad, row):
    """A label outside [0, classes) is an error naming it, never a read or write
    outside the arrays (labels of 2**40 crashed both compiled backends; 10 on the
    first row silently wrote the wrong gradient)."""
    k = backend.load(backend_name)
    y = np.full((5, 10), 0.1)
    t = np.array([3, 1, 4, 1, 5], np.int64)
    t[row] = bad
    args = LABEL_KERNELS[name](y, t)
    with pytest.raises(ValueError, match=rf"label {bad} at index {row} is out of range for 10 classes"):
        getattr(k, name)(*args)
    if len(args) > 2:  # the output was not written
        assert np.isnan(args[-1]).all()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_softmax_with_loss_keeps_its_labels(backend_name):
    """The layer's backward uses the labels its forward saw, not the caller's array
    changed in between (which crashed the compiled backends with labels of 2**40)."""
    from fastnet.layers import SoftmaxWithLoss

    with backend.use_backend(backend_name):
        x = np.random.default_rng(0).standard_normal((5, 10))
        t = np.array([3, 1, 4, 1, 5])
        layer, fresh = SoftmaxWithLoss(), SoftmaxWithLoss()
        layer.forward(x, t)
        fresh.forward(x, t.copy())
        t[:] = 2**40
        np.testing.assert_array_equal(layer.backward(), fresh.backward())
        onehot = np.eye(10)[[3, 1, 4, 1, 5]]
        layer.forward(x, onehot)
        onehot[:] = 7.0
        np.testing.assert_array_equal(layer.backward(), fresh.backward())


@pytest.mark.parametrize("backend_name", COMPILED)
def test_nan_and_inf_stay_visible(backend_name):
    k = backend.load(backend_name)
    x = np.array([[np.nan, 1.0, np.inf, -np.inf]])
    for name in ("sigmoid", "relu"):
        ref = getattr(backend.load("numpy"), name)(x, np.empty_like(x))
        got = getattr(k, name)(x, np.empty_like(x))
        np.testing.assert_array_equal(got, ref, err_msg=name)
    y = k.softmax(np.array([[np.nan, 0.0], [np.inf, 0.0], [0.0, 0.0]]), np.empty((3, 2)))
    assert np.isnan(y[0]).all() and np.isnan(y[1]).all() and np.allclose(y[2], 0.5)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(ELEMENTARY),
    backend_name=st.sampled_from(COMPILED),
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 9),
    d=st.integers(1, 11),
    m=st.integers(1, 8),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    strided=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_parity_hypothesis(name, backend_name, dtype, n, d, m, scale, strided, seed):
    args, outs = make_case(name, n, d, m, dtype, np.random.default_rng(seed), scale, strided)
    run_both(name, backend_name, args, outs, dtype)


# ---------------------------------------------------------------- CSR rows
def _dense(csr, row0, n, D, dtype):
    """Rows row0 : row0 + n of CSR rows as a dense float array (uint8 pixels / 255)."""
    indptr, indices, data = csr
    rows = np.zeros((n, D))
    values = data / 255.0 if data.dtype == np.uint8 else data.astype(float)
    for r in range(n):
        lo, hi = indptr[row0 + r], indptr[row0 + r + 1]
        rows[r, indices[lo:hi]] = values[lo:hi]
    return rows.astype(dtype) if data.dtype != np.uint8 else rows


def _sparse_case(dtype, B, D, H, C, N=60, density=0.2, pixels=True, seed=0):
    """Sparse rows (some empty, a batch that repeats rows) and a two-layer net."""
    rng = np.random.default_rng(seed)
    mask = rng.random((N, D)) < density
    mask[::7] = False  # rows without a single non-zero
    if pixels:
        X = (rng.integers(1, 256, (N, D)) * mask).astype(np.uint8)
    else:
        X = (rng.standard_normal((N, D)) * mask).astype(dtype)
    T = rng.integers(0, C, N).astype(np.int64)
    idx = rng.integers(0, N, B).astype(np.int64)
    idx[: min(B, 3)] = idx[0]  # the same row twice or more in one batch
    params = [(0.1 * rng.standard_normal(shape)).astype(dtype) for shape in ((D, H), (H,), (H, C), (C,))]
    work = tuple(np.full(shape, np.nan, dtype) for shape in
                 ((B, D), (B, H), (B, C), (B, H), (D, H), (H,), (H, C), (C,)))
    return X, T, idx, params, work


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_sparse_rows_parity(backend_name, dtype):
    rng = np.random.default_rng(5)
    X = (rng.integers(0, 256, (40, 33)) * (rng.random((40, 33)) < 0.3)).astype(dtype)
    X[3] = 0
    indptr, indices, data = backend.load(backend_name).sparse_rows(X)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and data.dtype == X.dtype
    assert indptr[0] == 0 and indptr[-1] == np.count_nonzero(X) == len(indices) == len(data)
    dense = np.zeros_like(X)
    for r in range(X.shape[0]):
        cols = indices[indptr[r]:indptr[r + 1]]
        assert np.all(np.diff(cols) > 0)  # sorted within each row
        dense[r, cols] = data[indptr[r]:indptr[r + 1]]
    np.testing.assert_array_equal(dense, X)
    with pytest.raises(TypeError, match="X must be uint8, float32 or float64, got int16"):
        backend.load(backend_name).sparse_rows(X.astype(np.int16))


@pytest.mark.parametrize("backend_name", ["numba", "cython"])
def test_sparse_rows_uint8_blocks(backend_name):
    """uint8 rows are scanned eight pixels at a time where all eight are zero: every width
    around that step, the last non-zero anywhere in a block, full and empty rows, and
    nothing written past a row's own entries (the arrays equal NumPy's CSR exactly)."""
    k = backend.load(backend_name)
    rng = np.random.default_rng(11)
    for width in range(1, 27):
        X = (rng.integers(1, 256, (60, width)) * (rng.random((60, width)) < 0.25)).astype(np.uint8)
        X[0] = 0
        X[1] = rng.integers(1, 256, width)
        for r in range(2, min(width + 2, 60)):  # one non-zero, at each column in turn
            X[r] = 0
            X[r, r - 2] = 7
        indptr, indices, data = k.sparse_rows(X)
        rows, cols = np.nonzero(X)
        np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(np.count_nonzero(X, axis=1))]))
        np.testing.assert_array_equal(indices, cols)
        np.testing.assert_array_equal(data, X[rows, cols])


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("pixels", [True, False])
@pytest.mark.parametrize("act", [0, 1, 2])
# hidden sizes for the vector loops: under one vector, a vector and a bit (a padded last
# vector), whole vectors, and more than four vectors (two passes over each row).  W in the
# split layout (whole vectors, then a tail of up to 16 bytes apart: fn_w_main in _sparse.h)
# where the lanes past whole vectors are at most 16 bytes: float32 19, 20, 50, 100 and
# float64 10, 50, each side of that edge with 11 and 21
@pytest.mark.parametrize("H", [7, 10, 11, 19, 20, 21, 32, 50, 100])
def test_sparse_affine_parity(backend_name, dtype, pixels, act, H, vectors):
    ref, got = backend.load("numpy"), backend.load(backend_name)
    X, _, _, (W, b, _, _), _ = _sparse_case(dtype, 1, 37, H, 3, N=5000, pixels=pixels)
    csr = ref.sparse_rows(X)
    for row0, n in ((0, 5000), (13, 1), (4990, 10)):
        expected = ref.sparse_affine(*csr, row0, W, b, act, np.empty((n, H), dtype))
        out = got.sparse_affine(*csr, row0, W, b, act, np.full((n, H), np.nan, dtype))
        rows = _dense(csr, row0, n, 37, dtype)
        _close_after_product(out, expected, rows, W, b, act, dtype, f"{backend_name} rows {row0}+{n}")
    with pytest.raises(IndexError, match=r"rows \[4999, 5001\) are out of range for 5000 rows"):
        got.sparse_affine(*csr, 4999, W, b, act, np.empty((2, H), dtype))


def test_every_kernel_has_a_parity_test():
    """A kernel added to the contract must get a parity test: list it here when it does.
    Each named test must exist and call the kernel (itself or through a helper of its
    module) on a compiled backend and on the reference (deleting or renaming a parity
    test fails here)."""
    import importlib
    import inspect

    tested_elsewhere = {"train_steps_mlp": "test_mlp_engine.test_train_steps_parity",
                        "train_steps_mlp_sparse": "test_mlp_engine.test_train_steps_parity",
                        "mlp_gradient": "test_mlp_engine.test_mlp_gradient_parity",
                        "predict_mlp": "test_mlp_engine.test_predict_parity",
                        "sparse_predict_mlp": "test_mlp_engine.test_predict_parity",
                        "numerical_gradient_mlp": "test_mlp_engine.test_numerical_gradient_parity",
                        "sparse_rows": "test_sparse_rows_parity",
                        "sparse_affine": "test_sparse_affine_parity"}
    assert set(contract.KERNELS) == set(ELEMENTARY) | set(tested_elsewhere)
    here = sys.modules[__name__]
    for kernel, where in {**{k: "test_parity_sizes" for k in ELEMENTARY}, **tested_elsewhere}.items():
        module, _, name = where.rpartition(".")
        test = getattr(importlib.import_module(module) if module else here, name, None)
        assert callable(test), f"{kernel}: its parity test {where} is gone"
        source = inspect.getsource(test)
        owner = inspect.getmodule(test)
        for helper in set(re.findall(r"\b(_\w+)\(", source)):  # and the module's helpers it calls
            if callable(getattr(owner, helper, None)):
                source += inspect.getsource(getattr(owner, helper))
        if kernel in ELEMENTARY:  # parametrised over ELEMENTARY, compared by run_both
            assert "run_both(name, backend_name" in source
        else:
            assert re.search(rf"\.{kernel}\b", source), f"{where} does not call {kernel}"
