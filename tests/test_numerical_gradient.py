"""The network-aware numerical gradient equals the book's loop; gradcheck reports and raises."""

import numpy as np
import pytest

import fastnet
from fastnet import backend
from fastnet.datasets import load_mnist
from fastnet.gradient import GradcheckError, gradcheck, numerical_gradient, numerical_gradient_net
from fastnet.kernels.contract import mlp_size
from fastnet.nets import MultiLayerNet, TwoLayerNet
from fastnet.train import Trainer


def _book_loss(x, t, sizes, theta, act):
    return backend.load("numpy")._mlp_loss(x, t, np.array(sizes), act, theta)


def _book_elements(x, t, sizes, theta, act, indices, h=1e-4):
    """The book's loop (perturb in place, two full losses) for some elements of theta."""
    out = []
    for i in indices:
        tmp = theta[i]
        theta[i] = tmp + h
        hi = _book_loss(x, t, sizes, theta, act)
        theta[i] = tmp - h
        lo = _book_loss(x, t, sizes, theta, act)
        theta[i] = tmp
        out.append((hi - lo) / (2 * h))
    return np.array(out)


@pytest.mark.parametrize("backend_name", ["numba", "cython"])
@pytest.mark.parametrize("act", [1, 2])
@pytest.mark.parametrize("sizes", [[40, 9, 6], [40, 9, 7, 6]])
def test_equals_reference_loop_on_random_data(backend_name, act, sizes, rng):
    B, D, H = 16, 40, 9
    x = rng.random((B, D)) * (rng.random((B, D)) > 0.6)
    x[:, :5] = 0  # inputs that are zero for the whole batch
    t = rng.integers(0, sizes[-1], B)
    theta = 0.5 * rng.standard_normal(mlp_size(sizes))
    ref, got = np.empty_like(theta), np.empty_like(theta)
    backend.load("numpy").numerical_gradient_mlp(x, t, np.array(sizes), act, theta, 1e-4, ref)
    backend.load(backend_name).numerical_gradient_mlp(x, t, np.array(sizes), act, theta, 1e-4, got)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-8)
    assert not got[: 5 * H].any()  # exactly zero where the input is zero for the batch


@pytest.mark.parametrize("backend_name", ["numba", "cython"])
@pytest.mark.parametrize("act", [1, 2])
def test_float32_equals_the_float64_reference(backend_name, act, rng):
    """float32 kernels against the reference loop in float64 on the same (float32) values:
    the kernels sum in float64, so only the rounding of a float32 weight moved by h
    remains (the float32 reference loop itself is off by 2e-3: its losses are float32)."""
    sizes = np.array([40, 9, 7, 6])
    x = (rng.random((16, 40)) * (rng.random((16, 40)) > 0.6)).astype(np.float32)
    t = rng.integers(0, 6, 16)
    theta = (0.5 * rng.standard_normal(mlp_size(sizes))).astype(np.float32)
    ref = np.empty(theta.size)
    backend.load("numpy").numerical_gradient_mlp(x.astype(float), t, sizes, act, theta.astype(float), 1e-4, ref)
    got = np.full_like(theta, np.nan)
    backend.load(backend_name).numerical_gradient_mlp(x, t, sizes, act, theta, 1e-4, got)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend_name", ["numba", "cython"])
@pytest.mark.parametrize("hidden", [[50], [100, 100]])
def test_equals_reference_loop_on_mnist(backend_name, hidden, mnist_dir):
    """100 MNIST images, float64: sampled elements of every layer equal the book's loop
    within 1e-8, and the rows of W1 for pixels that are 0 in the whole batch are 0."""
    (x_train, t_train), _ = load_mnist(data_dir=mnist_dir.parent, download=False, dtype=np.float64)
    x, t = x_train[:100], t_train[:100].astype(np.int64)
    sizes = [784, *hidden, 10]
    rng = np.random.default_rng(5)
    theta = 0.1 * rng.standard_normal(mlp_size(sizes))
    got = np.empty_like(theta)
    backend.load(backend_name).numerical_gradient_mlp(x, t, np.array(sizes), 1, theta, 1e-4, got)
    H = hidden[0]
    active = np.flatnonzero(x.any(axis=0))
    idx = [np.ravel_multi_index((rng.choice(active, 60), rng.integers(0, H, 60)), (784, H))]
    start = 784 * H
    for a, b in zip(sizes[1:-1], sizes[2:]):  # b_k, then W_k+1 and b_k+1 of the layers above
        idx += [start + rng.choice(a, 20, replace=False), start + a + rng.choice(a * b, 40, replace=False)]
        start += a + a * b
    idx.append(start + np.arange(10))
    idx = np.concatenate(idx)
    np.testing.assert_allclose(got[idx], _book_elements(x, t, sizes, theta, 1, idx), rtol=0, atol=1e-8)
    zero_rows = np.flatnonzero(~x.any(axis=0))
    assert zero_rows.size > 50 and not got[: 784 * H].reshape(784, H)[zero_rows].any()


@pytest.mark.parametrize("backend_name", ["numba", "cython"])
@pytest.mark.parametrize("where", ["theta", "x"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_give_nan_as_the_book_loop(backend_name, where, bad, rng):
    """A NaN or inf weight or input makes the book's mean loss NaN at every move, so each
    entry of its gradient is NaN: the kernels' ReLU keeps NaN, and the entries of an
    input that is 0 in every row (column 7, whose rows the kernels skip) are NaN too."""
    sizes = np.array([10, 6, 5, 4])
    x = rng.random((8, 10))
    x[:, 7] = 0
    t = rng.integers(0, 4, 8)
    theta = 0.5 * rng.standard_normal(mlp_size(sizes))
    (theta if where == "theta" else x)[3] = bad
    ref, got = np.empty_like(theta), np.empty_like(theta)
    with np.errstate(all="ignore"):
        backend.load("numpy").numerical_gradient_mlp(x, t, sizes, 1, theta, 1e-4, ref)
    backend.load(backend_name).numerical_gradient_mlp(x, t, sizes, 1, theta, 1e-4, got)
    assert np.isnan(ref).all() and np.isnan(got).all()


def test_net_method_uses_the_backend_and_matches(rng):
    x, t = rng.random((6, 12)), rng.integers(0, 3, 6)
    results = {}
    for name in ("numpy", "cython", "numba"):
        with fastnet.use_backend(name):
            net = TwoLayerNet(12, 5, 3, weight_init_std=0.5, seed=4)
            results[name] = net.numerical_gradient(x, np.eye(3)[t])
    for name in ("cython", "numba"):
        for key in results["numpy"]:
            np.testing.assert_allclose(results[name][key], results["numpy"][key], atol=1e-8)


def _book_loop(net, x, t):
    """The book's ``numerical_gradient(loss_W, params[key])`` for every parameter."""
    return {key: numerical_gradient(lambda _: net.loss(x, t), net.params[key]) for key in net.params}


def test_deep_nets_equal_the_book_loop_and_soft_labels_use_it(rng):
    net = MultiLayerNet(6, [4, 3], 2, weight_init_std=0.5, seed=0)
    x = rng.random((3, 6))
    t = np.array([0, 1, 1])
    grads = numerical_gradient_net(net, x, t)
    book = _book_loop(net, x, t)
    assert set(grads) == set(book) == {"W1", "b1", "W2", "b2", "W3", "b3"}
    for key in book:
        np.testing.assert_allclose(grads[key], book[key], rtol=0, atol=1e-10, err_msg=key)
    soft = np.array([[0.3, 0.7], [0.5, 0.5], [1.0, 0.0]])
    two = TwoLayerNet(6, 4, 2, weight_init_std=0.5, seed=0)
    g = numerical_gradient_net(two, x, soft)
    for key, value in _book_loop(two, x, soft).items():
        np.testing.assert_allclose(g[key], value, rtol=0, atol=1e-10, err_msg=key)
    assert np.abs(g["W1"]).max() > 1e-3  # not trivially zero


def test_gradcheck_report(mnist_dir):
    (x, t), _ = load_mnist(data_dir=mnist_dir.parent, download=False, dtype=np.float64, one_hot_label=True)
    with fastnet.use_backend("cython"):
        net = TwoLayerNet(784, 50, 10, seed=0)
        report = gradcheck(net, x[:100], t[:100])
    assert report.passed
    assert [r["name"] for r in report.rows] == ["W1", "b1", "W2", "b2"]
    assert report["W1"]["checked"] == 39200 and report["b2"]["mean_abs"] < 1e-6
    assert max(row["max_abs"] for row in report.rows) < 1e-5  # ReLU kinks: 7e-6 at most here
    assert "PASSED" in str(report)


def test_gradcheck_catches_a_wrong_backprop(rng):
    net = TwoLayerNet(8, 5, 3, weight_init_std=0.5, seed=0)
    x, t = rng.random((4, 8)), rng.integers(0, 3, 4)
    good = net.gradient

    def broken(x, t):
        grads = good(x, t)
        grads["W2"] = grads["W2"].copy()
        grads["W2"][1, 2] *= 1.5
        return grads

    net.gradient = broken
    report = gradcheck(net, x, t)
    assert not report.passed and not report["W2"]["passed"] and report["W2"]["worst"] == (1, 2)
    assert report["W1"]["passed"]
    with pytest.raises(GradcheckError, match=r"W2\[1, 2\]: backprop .* numerical .* atol"):
        gradcheck(net, x, t, raise_exception=True)
    sub = gradcheck(net, x, t, subset=3, params=["b1"])
    assert sub["b1"]["checked"] == 3 and sub.passed


def test_numerical_training_tracks_backprop(rng):
    centers = rng.random((4, 20))
    t = rng.integers(0, 4, 400)
    x = np.clip(centers[t] + 0.2 * rng.standard_normal((400, 20)), 0, 1)
    histories = {}
    for gradient in ("backprop", "numerical"):
        with fastnet.use_backend("cython"):
            net = TwoLayerNet(20, 10, 4, seed=1, weight_init_std=0.3)
            histories[gradient] = Trainer(net, x, t, iters=60, batch_size=40, lr=0.5, seed=3,
                                          gradient=gradient).fit()
    # the same curve: the two gradients differ only by the 1e-7 inside the log and at
    # ReLU kinks, so the runs drift apart slowly (0.7% here after 60 steps)
    np.testing.assert_allclose(histories["numerical"].loss, histories["backprop"].loss, rtol=2e-2)
    assert histories["numerical"].loss[-1] < 0.8 * histories["numerical"].loss[0]


def test_numba_compiled_f_runs_the_loop_compiled():
    from numba import njit

    @njit
    def f(x):
        return x[0] ** 2 + 3 * x[1] ** 3

    x = np.array([[3.0, 2.0]]).reshape(2)
    np.testing.assert_allclose(numerical_gradient(f, x), [6.0, 36.0], rtol=1e-7)
    assert x.tolist() == [3.0, 2.0]


def test_gradcheck_counts_kinks_of_deep_nets(rng):
    """A dead hidden unit makes the next layer's pre-activation exactly its bias, 0: the
    central difference of that bias straddles ReLU's kink (0.5 against backprop's 0).
    Found by tests/fuzz_inputs.py as `fastnet gradcheck --hidden 1,2` reporting FAILED."""
    net = MultiLayerNet(8, [1, 2], 3, seed=0)
    net.params["W1"][...] = -1.0  # the one unit of the first hidden layer never fires
    x = rng.random((5, 8))
    report = gradcheck(net, x, rng.integers(0, 3, 5))
    assert report.passed, str(report)
    assert report["b2"]["kinks"] == 2 and report["W2"]["kinks"] == 0
    assert gradcheck(net, x, rng.integers(0, 3, 5), include_kinks=True).passed is False


# ---------------------------------------------------------------- the kernels' linear maps
# Where no ReLU above a moved unit changes side, the compiled kernels move the scores
# along the row's linear map instead of propagating the move layer by layer
# (_numgrad.pxi, numba_backend.py).  NUMGRAD_LINEAR = False propagates every move: both
# must equal the book's loop.


def _compiled_numgrad(backend_name, x, t, sizes, act, theta, h, monkeypatch, linear, map_bytes=None):
    if backend_name not in backend.available_backends():
        pytest.skip(f"the {backend_name} backend is not available")
    if backend_name == "cython":
        from fastnet.kernels import _cython as module
    else:
        from fastnet.kernels import numba_backend as module
    monkeypatch.setattr(module, "NUMGRAD_LINEAR", linear)
    if map_bytes is not None:
        monkeypatch.setattr(module, "NUMGRAD_MAP_BYTES", map_bytes)
    got = np.empty_like(theta)
    module.numerical_gradient_mlp(x, t, np.array(sizes), act, theta, h, got)
    return got


@pytest.mark.parametrize("backend_name", ["numba", "cython"])
@pytest.mark.parametrize("act", [1, 2])
@pytest.mark.parametrize("sizes", [[30, 6], [30, 9, 6], [30, 12, 9, 6], [30, 11, 10, 9, 8, 6]])
@pytest.mark.parametrize("h", [1e-4, 0.3])
def test_linear_maps_equal_the_propagation_and_the_book(backend_name, act, sizes, h, rng, monkeypatch):
    """h = 0.3 moves units far enough that many ReLUs above change side: those moves
    must leave the map for the propagation and still equal the book's loop."""
    x = rng.random((12, 30)) * (rng.random((12, 30)) > 0.5)
    t = rng.integers(0, 6, 12)
    theta = 0.5 * rng.standard_normal(mlp_size(sizes))
    ref = np.empty_like(theta)
    backend.load("numpy").numerical_gradient_mlp(x, t, np.array(sizes), act, theta, h, ref)
    linear = _compiled_numgrad(backend_name, x, t, sizes, act, theta, h, monkeypatch, True)
    propagated = _compiled_numgrad(backend_name, x, t, sizes, act, theta, h, monkeypatch, False)
    np.testing.assert_allclose(linear, ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(propagated, ref, rtol=0, atol=1e-8)
    if act == 1 and len(sizes) > 3:
        # the maps were taken: a ReLU map through two or more layers above is a product
        # of weights, formed before the move, so its sums run in another order than the
        # propagation's (a map over the top two layers is the top W itself, the
        # propagation's own arithmetic, and may give the same bits)
        assert not np.array_equal(linear, propagated)


@pytest.mark.parametrize("backend_name", ["numba", "cython"])
def test_linear_maps_leave_a_unit_at_zero_to_the_propagation(backend_name, rng, monkeypatch):
    """Unit 0 of both hidden layers sits exactly at 0 (no weights in but W2[0, 0] = 1, no
    bias): moving b1[0] by +h turns both on, by -h neither.  A unit at 0 changes side for
    any move that reaches it, so its limit is 0 and the move is propagated."""
    sizes = [10, 6, 5, 4]
    x = rng.random((8, 10))
    t = rng.integers(0, 4, 8)
    theta = 0.5 * rng.standard_normal(mlp_size(sizes))
    W1, b1 = theta[:60].reshape(10, 6), theta[60:66]
    W2, b2 = theta[66:96].reshape(6, 5), theta[96:101]
    W1[:, 0] = b1[0] = 0
    W2[:, 0] = b2[0] = 0
    W2[0, 0] = 1
    ref = np.empty_like(theta)
    backend.load("numpy").numerical_gradient_mlp(x, t, np.array(sizes), 1, theta, 1e-4, ref)
    got = _compiled_numgrad(backend_name, x, t, sizes, 1, theta, 1e-4, monkeypatch, True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-8)
    assert abs(got[60]) > 1e-3  # b1[0]: half the slope through both kinks


@pytest.mark.parametrize("where", ["theta", "x"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("backend_name", ["numba", "cython"])
def test_linear_maps_give_what_the_propagation_gives_for_non_finite_values(backend_name, where, bad, rng,
                                                                           monkeypatch):
    """The book's mean loss is NaN at every move: every entry is NaN, as in its loop."""
    sizes = [10, 6, 5, 4]
    x = rng.random((8, 10))
    t = rng.integers(0, 4, 8)
    theta = 0.5 * rng.standard_normal(mlp_size(sizes))
    (theta if where == "theta" else x)[3] = bad
    linear = _compiled_numgrad(backend_name, x, t, sizes, 1, theta, 1e-4, monkeypatch, True)
    propagated = _compiled_numgrad(backend_name, x, t, sizes, 1, theta, 1e-4, monkeypatch, False)
    assert np.isnan(linear).all() and np.isnan(propagated).all()


@pytest.mark.parametrize("backend_name", ["numba", "cython"])
def test_linear_maps_by_chunks_of_rows_give_the_same_bits(backend_name, rng, monkeypatch):
    """The maps are built for as many rows as NUMGRAD_MAP_BYTES holds at a time; each
    entry still sums its rows in row order, so one row a chunk changes no bit."""
    sizes = [30, 12, 9, 6]
    x = rng.random((20, 30)) * (rng.random((20, 30)) > 0.5)
    t = rng.integers(0, 6, 20)
    theta = 0.5 * rng.standard_normal(mlp_size(sizes))
    whole = _compiled_numgrad(backend_name, x, t, sizes, 1, theta, 1e-4, monkeypatch, True)
    by_row = _compiled_numgrad(backend_name, x, t, sizes, 1, theta, 1e-4, monkeypatch, True, map_bytes=1)
    np.testing.assert_array_equal(by_row, whole)
