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
WHOLE_NET = {"train_step_2layer", "train_steps_2layer", "numerical_gradient_2layer"}
#: kernels over CSR rows, with parity tests of their own (below)
SPARSE = {"sparse_rows", "sparse_affine", "sparse_predict_2layer", "train_step_2layer_sparse",
          "train_steps_2layer_sparse"}
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


def _step_case(dtype, B=100, D=784, H=50, C=10, N=300, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.random((N, D)) * (rng.random((N, D)) > 0.8)).astype(dtype)
    T = rng.integers(0, C, N).astype(np.int64)
    idx = rng.integers(0, N, B).astype(np.int64)
    params = [(0.1 * rng.standard_normal(shape)).astype(dtype) for shape in ((D, H), (H,), (H, C), (C,))]
    work = tuple(np.full(shape, np.nan, dtype) for shape in
                 ((B, D), (B, H), (B, C), (B, H), (D, H), (H,), (H, C), (C,)))
    return X, T, idx, params, work


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("act", [1, 2])
@pytest.mark.parametrize("sizes", [(100, 784, 50, 10), (1, 5, 3, 2), (7, 13, 9, 4)])
def test_train_step_parity(backend_name, dtype, act, sizes):
    B, D, H, C = sizes
    ref, got = backend.load("numpy"), backend.load(backend_name)
    X, T, idx, params, work = _step_case(dtype, B, D, H, C)
    # lr == 0: the gradients
    ref_work = tuple(w.copy() for w in work)
    loss_ref = ref.train_step_2layer(X, T, idx, *[p.copy() for p in params], 0.0, act, ref_work)
    loss = got.train_step_2layer(X, T, idx, *params, 0.0, act, work)
    _close(loss, loss_ref, dtype, "loss")
    for name, a, b in zip(("dW1", "db1", "dW2", "db2"), work[4:], ref_work[4:]):
        _close(a, b, dtype, f"{backend_name} {name}")
    # lr != 0: the updated parameters
    ref_params = [p.copy() for p in params]
    ref.train_step_2layer(X, T, idx, *ref_params, 0.5, act, ref_work)
    got.train_step_2layer(X, T, idx, *params, 0.5, act, work)
    for name, a, b in zip(("W1", "b1", "W2", "b2"), params, ref_params):
        _close(a, b, dtype, f"{backend_name} updated {name}")


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_train_step_uint8_pixels_equal_normalised_floats(backend_name, dtype):
    """uint8 X gives exactly the step of X / 255 in the parameters' dtype."""
    k = backend.load(backend_name)
    X, T, idx, params, work = _step_case(dtype, B=20, D=30, H=8, C=5)
    pixels = np.random.default_rng(3).integers(0, 256, X.shape).astype(np.uint8)
    floats = pixels.astype(dtype)
    floats /= 255.0
    p_float = [p.copy() for p in params]
    loss_a = k.train_step_2layer(pixels, T, idx, *params, 0.3, 1, work)
    loss_b = k.train_step_2layer(floats, T, idx, *p_float, 0.3, 1, tuple(w.copy() for w in work))
    assert loss_a == loss_b
    for a, b in zip(params, p_float):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend_name", COMPILED)
def test_train_step_bad_indices(backend_name):
    X, T, idx, params, work = _step_case(np.float64, B=4, D=6, H=3, C=2, N=10)
    k = backend.load(backend_name)
    with pytest.raises(IndexError, match="batch index .*out of range"):
        k.train_step_2layer(X, T, np.array([0, 1, 2, 10]), *params, 0.1, 1, work)
    T[3] = 5
    with pytest.raises(ValueError, match="out of range"):
        k.train_step_2layer(X, T, np.array([0, 1, 2, 3]), *params, 0.1, 1, work)
    with pytest.raises(ValueError, match="shape"):
        k.train_step_2layer(X, T, np.array([0, 1, 2]), *params, 0.1, 1, work)


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
def test_sparse_affine_parity(backend_name, dtype, pixels, act, H):
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


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("pixels", [True, False])
@pytest.mark.parametrize("act", [0, 1, 2])
# (hidden, classes): the book's 50 and 10; classes filling one 64-byte vector exactly
# (float32 16, float64 8), one class more than that (the plain loops), and a single class
@pytest.mark.parametrize("H,C", [(50, 10), (7, 16), (19, 8), (33, 17), (5, 9), (12, 1)])
def test_sparse_predict_parity(backend_name, dtype, pixels, act, H, C):
    """Labels against the reference (sparse_affine, affine, numpy.argmax) for row ranges
    that are not whole blocks of 4 or of 64 rows; where two scores are close enough for
    the order of a sum to matter, a label may differ, so those rows are left out."""
    ref, got = backend.load("numpy"), backend.load(backend_name)
    X, _, _, (W1, b1, W2, b2), _ = _sparse_case(dtype, 1, 37, H, C, N=3000, pixels=pixels, seed=C)
    W2 *= 10  # scores some units apart: ties are rare
    csr = ref.sparse_rows(X)
    for row0, n in ((0, 3000), (13, 1), (2990, 10), (101, 131)):
        expected = ref.sparse_predict_2layer(*csr, row0, W1, b1, W2, b2, act, np.empty(n, np.int64))
        out = got.sparse_predict_2layer(*csr, row0, W1, b1, W2, b2, act, np.full(n, -1, np.int64))
        h = ref.sparse_affine(*csr, row0, W1, b1, act, np.empty((n, H), dtype))
        s = np.sort(h.astype(np.float64) @ W2 + b2, axis=1)
        clear = (s[:, -1] - s[:, -2] > 1e-3) if C > 1 else np.ones(n, bool)
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(out[clear], expected[clear], err_msg=f"rows {row0}+{n}")
        assert out.min() >= 0 and out.max() < C


@pytest.mark.skipif("numba" not in backend.available_backends(), reason="Numba is not installed")
@pytest.mark.parametrize("H", [49, 50, 64])
def test_numba_sparse_predict_padded_rows_give_the_same_labels(H):
    """Numba's sparse_predict_2layer reads W1 in padded rows for float32 nets of 49 to 64
    hidden units when a call has more rows than W1 (each lane summed as before): one call
    over all rows gives exactly the labels of calls over fewer rows (the unpadded loops),
    near-ties included."""
    k = backend.load("numba")
    X, _, _, (W1, b1, W2, b2), _ = _sparse_case(np.float32, 1, 37, H, 10, N=2000, pixels=True, seed=H)
    csr = backend.load("numpy").sparse_rows(X)
    whole = k.sparse_predict_2layer(*csr, 0, W1, b1, W2, b2, 1, np.empty(2000, np.int64))
    parts = np.concatenate([k.sparse_predict_2layer(*csr, r, W1, b1, W2, b2, 1, np.empty(20, np.int64))
                            for r in range(0, 2000, 20)])
    np.testing.assert_array_equal(whole, parts)


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
def test_sparse_predict_ties_and_nan(backend_name):
    """numpy.argmax's rules: the first of equal maxima, and the first NaN when a score is
    NaN; and bad input is refused."""
    k = backend.load(backend_name)
    X = np.zeros((9, 4), np.uint8)
    X[:, 0] = 255
    csr = backend.load("numpy").sparse_rows(X)
    W1, b1 = np.eye(4, 3, dtype=np.float32), np.zeros(3, np.float32)
    W2 = np.zeros((3, 5), np.float32)
    for b2, label in (([0, 2, 2, 1, 2], 1), ([3, 3, 3, 3, 3], 0), ([0, 1, np.nan, 5, np.nan], 2),
                      ([np.nan, 9, 9, 9, 9], 0), ([-np.inf, -np.inf, -1, 7, np.inf], 4)):
        out = k.sparse_predict_2layer(*csr, 0, W1, b1, W2, np.array(b2, np.float32), 1, np.empty(9, np.int64))
        np.testing.assert_array_equal(out, label, err_msg=str(b2))
    b2 = np.zeros(5, np.float32)
    if backend_name == "numpy":
        return
    with pytest.raises(TypeError, match="int64"):
        k.sparse_predict_2layer(*csr, 0, W1, b1, W2, b2, 1, np.empty(9, np.int32))
    with pytest.raises(TypeError, match="W2 is float64 but the other arrays are float32"):
        k.sparse_predict_2layer(*csr, 0, W1, b1, W2.astype(np.float64), b2, 1, np.empty(9, np.int64))
    with pytest.raises(ValueError, match=r"W2.*\(2, 5\)"):
        k.sparse_predict_2layer(*csr, 0, W1, b1, W2[:2], b2, 1, np.empty(9, np.int64))
    with pytest.raises(IndexError, match=r"rows \[5, 14\) are out of range for 9 rows"):
        k.sparse_predict_2layer(*csr, 5, W1, b1, W2, b2, 1, np.empty(9, np.int64))
    with pytest.raises(ValueError, match="act"):
        k.sparse_predict_2layer(*csr, 0, W1, b1, W2, b2, 3, np.empty(9, np.int64))
    bad = csr[1].copy()
    bad[0] = 4
    with pytest.raises(ValueError, match="outside"):
        k.sparse_predict_2layer(csr[0], bad, csr[2], 0, W1, b1, W2, b2, 1, np.empty(9, np.int64))


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("act", [1, 2])
@pytest.mark.parametrize("pixels", [True, False])
# hidden sizes: whole 64-byte vectors (float32: 16, 64), a last vector of at most half a
# vector (float32: 3, 9, 17, 24, 50, 100; the update writes only its lower half) or of
# more (float32: 30; float64: 24, 30).  The layers above the first run in vectors
# (_top.h) up to 64 hidden units and 16 classes in float32, 32 and 8 in float64, with
# BLAS beyond: classes 8, 16 and 17 and hidden units 64 and 100 sit on those edges.
@pytest.mark.parametrize("sizes", [(100, 784, 50, 10), (1, 5, 3, 2), (7, 13, 9, 4), (300, 200, 30, 10),
                                   (9, 20, 16, 3), (5, 30, 17, 4), (12, 40, 64, 5), (33, 60, 100, 10),
                                   (10, 50, 24, 6), (20, 30, 20, 8), (21, 30, 20, 16), (22, 30, 20, 17)])
def test_sparse_step_parity(backend_name, dtype, act, pixels, sizes):
    """The sparse step against the reference, and against the dense step of the same
    backend on the same rows (the sizes include batches big enough for threads)."""
    B, D, H, C = sizes
    ref, got = backend.load("numpy"), backend.load(backend_name)
    X, T, idx, params, work = _sparse_case(dtype, B, D, H, C, N=max(60, B), pixels=pixels)
    csr = ref.sparse_rows(X)
    ref_work = tuple(w.copy() for w in work)
    loss_ref = ref.train_step_2layer_sparse(*csr, T, idx, *[p.copy() for p in params], 0.0, act, ref_work)
    dense_work = tuple(w.copy() for w in work)
    loss_dense = got.train_step_2layer(X, T, idx, *[p.copy() for p in params], 0.0, act, dense_work)
    loss = got.train_step_2layer_sparse(*csr, T, idx, *params, 0.0, act, work)
    _close(loss, loss_ref, dtype, "loss")
    _close(loss, loss_dense, dtype, "loss against the dense step")
    for name, a, b, c in zip(("dW1", "db1", "dW2", "db2"), work[4:], ref_work[4:], dense_work[4:]):
        _close(a, b, dtype, f"{backend_name} {name}", terms=float(np.abs(b).max()) * 10)
        _close(a, c, dtype, f"{backend_name} {name} against the dense step", terms=float(np.abs(b).max()) * 10)
    ref_params = [p.copy() for p in params]
    ref.train_step_2layer_sparse(*csr, T, idx, *ref_params, 0.5, act, ref_work)
    got.train_step_2layer_sparse(*csr, T, idx, *params, 0.5, act, work)
    for name, a, b in zip(("W1", "b1", "W2", "b2"), params, ref_params):
        _close(a, b, dtype, f"{backend_name} updated {name}")


@pytest.mark.parametrize("backend_name", COMPILED)
def test_sparse_kernels_from_several_threads(backend_name):
    """The sparse kernels release the GIL and share one block of scratch memory between
    calls (the Cython loops read W in a padded copy): calls from several Python threads
    at once must give what the same calls give one after another."""
    from concurrent.futures import ThreadPoolExecutor

    k = backend.load(backend_name)
    cases = [_sparse_case(np.float32, 20, 60, H, 5, N=400, seed=s) for s, H in enumerate((50, 17, 64, 9))]

    def run(case):
        X, T, _, params, work = case
        csr = k.sparse_rows(X)
        params = [p.copy() for p in params]
        idx = np.random.default_rng(1).integers(0, X.shape[0], (8, 20))
        losses = np.empty(8)
        out = np.empty((X.shape[0], params[0].shape[1]), np.float32)
        labels = np.empty(X.shape[0], np.int64)
        for _ in range(5):
            k.train_steps_2layer_sparse(*csr, T, idx, *params, 0.1, 1, tuple(w.copy() for w in work), losses)
            k.sparse_affine(*csr, 0, params[0], params[1], 1, out)
            k.sparse_predict_2layer(*csr, 0, *params, 1, labels)
        return [out, losses, labels] + params

    serial = [run(c) for c in cases]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, cases * 3))
    for i, got in enumerate(threaded):
        for a, b in zip(got, serial[i % len(cases)]):
            np.testing.assert_array_equal(a, b)


_THREADS_SCRIPT = """
import sys, numpy as np
from fastnet import backend
k = backend.load("cython")
rng = np.random.default_rng(3)
X = (rng.integers(1, 256, (400, 300)) * (rng.random((400, 300)) < 0.2)).astype(np.uint8)
if sys.argv[1] == "lopsided":  # every non-zero in the second block of pixels: its thread is the slow one
    X[:, :150] = 0
    X[:, 150:] |= (rng.random((400, 150)) < 0.3).astype(np.uint8)
T = rng.integers(0, 10, 400)
p = [(0.1 * rng.standard_normal(s)).astype(np.float32) for s in ((300, 50), (50,), (50, 10), (10,))]
shapes = ((100, 300), (100, 50), (100, 10), (100, 50), (300, 50), (50,), (50, 10), (10,))
work = tuple(np.empty(s, np.float32) for s in shapes)
losses = np.empty(20)
csr = k.sparse_rows(X)
k.train_steps_2layer_sparse(*csr, T, rng.integers(0, 400, (20, 100)), *p, 0.1, 1, work, losses)
labels = k.sparse_predict_2layer(*csr, 0, *p, 1, np.empty(400, np.int64))
sys.stdout.write(np.concatenate([a.ravel() for a in p] + [losses]).tobytes().hex() + labels.tobytes().hex())
"""


@pytest.mark.skipif("cython" not in backend.available_backends(), reason="the Cython extension is not built")
@pytest.mark.parametrize("pixels", ["even", "lopsided"])
def test_sparse_steps_do_not_depend_on_the_thread_count(pixels):
    """The Cython sparse step splits blocks of pixels (rows of W1) and blocks of rows between
    threads so that no sum changes order with their number: 1, 2 or 3 threads, the same bits (and
    the same labels from sparse_predict_2layer, whose blocks of rows move with the split).
    Lopsided: all the work of the forward on one thread, so that a phase that does not wait
    for the other thread's forward sums reads them unfinished (it fails without fn_barrier)."""
    import os
    import subprocess
    import sys

    outs = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, pixels], capture_output=True, text=True,
                             env=env)
        assert run.returncode == 0, run.stderr
        outs.append(run.stdout)
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 1000


@pytest.mark.parametrize("backend_name", COMPILED)
def test_sparse_step_bad_input(backend_name):
    k = backend.load(backend_name)
    X, T, idx, params, work = _sparse_case(np.float64, 4, 6, 3, 2, N=10, pixels=True)
    indptr, indices, data = backend.load("numpy").sparse_rows(X)
    idx = np.array([1, 2, 3, 4])
    with pytest.raises(IndexError, match="batch index .*out of range for (10 rows|the CSR rows)"):
        k.train_step_2layer_sparse(indptr, indices, data, T, np.array([0, 1, 2, 10]), *params, 0.1, 1, work)
    bad = indices.copy()
    bad[indptr[1]] = 6  # a column the weights do not have
    with pytest.raises(ValueError, match="outside"):
        k.train_step_2layer_sparse(indptr, bad, data, T, idx, *[p.copy() for p in params], 0.1, 1, work)
    broken = indptr.copy()
    broken[2] = broken[-1] + 5  # points past the stored values
    with pytest.raises(ValueError, match="indptr"):
        k.train_step_2layer_sparse(broken, indices, data, T, idx, *params, 0.1, 1, work)
    with pytest.raises(TypeError, match="indices"):
        k.train_step_2layer_sparse(indptr, indices.astype(np.int64), data, T, idx, *params, 0.1, 1, work)
    with pytest.raises(TypeError, match="data"):
        k.train_step_2layer_sparse(indptr, indices, data.astype(np.float32), T, idx, *params, 0.1, 1, work)
    flat = [params[0].reshape(-1), *params[1:]]  # W1 1-D: its shape was read past its end
    with pytest.raises(ValueError, match="W1 must be 2-D"):
        k.train_step_2layer_sparse(indptr, indices, data, T, idx, *flat, 0.1, 1, work)
    T[idx[0]] = 7
    with pytest.raises(ValueError, match="out of range"):
        k.train_step_2layer_sparse(indptr, indices, data, T, idx, *params, 0.1, 1, work)


# ---------------------------------------------------------------- many steps per call
def _many_steps_case(dtype, sparse, S=5, B=30, D=40, H=50, C=7):
    X, T, _, params, work = _sparse_case(dtype, B, D, H, C, N=200, pixels=True, seed=4)
    idx = np.random.default_rng(9).integers(0, X.shape[0], (S, B))
    x = backend.load("numpy").sparse_rows(X) if sparse else (X,)
    return x, T, idx, params, work


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("act", [1, 2])
def test_many_steps_equal_single_steps(backend_name, dtype, sparse, act):
    """train_steps_2layer[_sparse] over idx (S, B) gives what S calls of the single step
    give on the same backend (the same code per step: identical), and what the
    reference gives (within tolerance)."""
    k, ref = backend.load(backend_name), backend.load("numpy")
    one = k.train_step_2layer_sparse if sparse else k.train_step_2layer
    many = k.train_steps_2layer_sparse if sparse else k.train_steps_2layer
    x, T, idx, params, work = _many_steps_case(dtype, sparse)
    single = [p.copy() for p in params]
    expected = [one(*x, T, idx[s], *single, 0.2, act, work) for s in range(len(idx))]
    ref_params = [p.copy() for p in params]
    ref_losses = np.empty(len(idx))
    ref_many = ref.train_steps_2layer_sparse if sparse else ref.train_steps_2layer
    assert ref_many(*x, T, idx, *ref_params, 0.2, act, tuple(w.copy() for w in work), ref_losses) == len(idx)
    losses = np.full(len(idx), np.nan)
    assert many(*x, T, idx, *params, 0.2, act, work, losses) == len(idx)
    np.testing.assert_array_equal(losses, expected)
    for a, b, c in zip(params, single, ref_params):
        np.testing.assert_array_equal(a, b)
        _close(a, c, dtype, f"{backend_name} after {len(idx)} steps", terms=10.0)
    _close(losses, ref_losses, dtype, "losses against the reference")


@pytest.mark.parametrize("backend_name", ("numpy",) + COMPILED)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_many_steps_bad_input_and_divergence(backend_name, sparse, dtype):
    """(float32 sparse on Cython: the layers above the first in vectors, _top.h; float64
    there: its 50 hidden units take the BLAS path.)"""
    k = backend.load(backend_name)
    many = k.train_steps_2layer_sparse if sparse else k.train_steps_2layer
    x, T, idx, params, work = _many_steps_case(dtype, sparse)
    before = [p.copy() for p in params]
    losses = np.empty(len(idx))
    late = idx.copy()
    late[-1, -1] = 10**6  # a bad row in the last step: refused before the first step
    with pytest.raises(IndexError, match="batch index .*out of range"):
        many(*x, T, late, *params, 0.1, 1, work, losses)
    T_bad = T.copy()
    T_bad[idx[-1, 0]] = 99
    with pytest.raises(ValueError, match="out of range"):
        many(*x, T_bad, idx, *params, 0.1, 1, work, losses)
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="lr"):
        many(*x, T, idx, *params, 0.0, 1, work, losses)
    with pytest.raises(ValueError, match=r"idx must be a non-empty 2-D array \(steps, batch\)"):
        many(*x, T, idx[0], *params, 0.1, 1, work, losses)  # 1-D idx
    with pytest.raises(ValueError, match="losses"):
        many(*x, T, idx, *params, 0.1, 1, work, np.empty(len(idx) + 1))
    # the first loss is not finite: stop after one step (W1[:, 0]: the first hidden unit
    # of every row with a non-zero pixel)
    for what, (i, where, value) in {"W2[0, 0] inf": (2, np.s_[0, 0], np.inf), "W1[:, 0] NaN": (0, np.s_[:, 0], np.nan),
                                    "b1 NaN": (1, np.s_[:], np.nan)}.items():
        bad = [p.copy() for p in params]
        bad[i][where] = value
        with np.errstate(invalid="ignore", over="ignore"):
            assert many(*x, T, idx, *bad, 0.1, 1, work, losses) == 1, what
        assert not np.isfinite(losses[0])


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_many_sparse_steps_stopping_keep_what_ran(backend_name, dtype):
    """A run stopped by a non-finite loss leaves the parameters as the single step that
    ran leaves them (Numba's float32 kernel works on a padded copy of W1 and b1 and must
    copy them back on that path too)."""
    k = backend.load(backend_name)
    x, T, idx, params, work = _many_steps_case(dtype, True)
    params[3][0] = np.inf  # b2: the first loss is not finite
    single = [p.copy() for p in params]
    losses = np.empty(len(idx))
    with np.errstate(invalid="ignore", over="ignore"):
        k.train_step_2layer_sparse(*x, T, idx[0], *single, 0.1, 1, tuple(w.copy() for w in work))
        assert k.train_steps_2layer_sparse(*x, T, idx, *params, 0.1, 1, work, losses) == 1
    assert not np.isfinite(losses[0])
    assert not np.array_equal(params[0], _many_steps_case(dtype, True)[3][0])  # W1 did change
    for a, b in zip(params, single):
        np.testing.assert_array_equal(a, b)


def test_every_kernel_has_a_parity_test():
    """A kernel added to the contract must get a parity test: list it here when it does.
    Each named test must exist and call the kernel on a compiled backend and on the
    reference (deleting or renaming a parity test fails here)."""
    import importlib
    import inspect

    tested_elsewhere = {"train_step_2layer": "test_train_step_parity",
                        "numerical_gradient_2layer":
                            "test_numerical_gradient.test_equals_reference_loop_on_random_data",
                        "sparse_rows": "test_sparse_rows_parity",
                        "sparse_affine": "test_sparse_affine_parity",
                        "sparse_predict_2layer": "test_sparse_predict_parity",
                        "train_step_2layer_sparse": "test_sparse_step_parity",
                        "train_steps_2layer": "test_many_steps_equal_single_steps",
                        "train_steps_2layer_sparse": "test_many_steps_equal_single_steps"}
    assert set(contract.KERNELS) == set(ELEMENTARY) | set(tested_elsewhere)
    here = sys.modules[__name__]
    for kernel, where in {**{k: "test_parity_sizes" for k in ELEMENTARY}, **tested_elsewhere}.items():
        module, _, name = where.rpartition(".")
        test = getattr(importlib.import_module(module) if module else here, name, None)
        assert callable(test), f"{kernel}: its parity test {where} is gone"
        source = inspect.getsource(test)
        if kernel in ELEMENTARY:  # parametrised over ELEMENTARY, compared by run_both
            assert "run_both(name, backend_name" in source
        else:
            assert re.search(rf"\.{kernel}\b", source), f"{where} does not call {kernel}"
