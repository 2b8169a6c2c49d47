"""The book's networks: chapter 3 inference, chapter 4/5 TwoLayerNet, backprop vs numerical."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fastnet.datasets import load_mnist
from fastnet.io import load_book_params
from fastnet.nets import MultiLayerNet, ThreeLayerNet, TwoLayerNet, forward, init_network, predict


def test_chapter3_toy_network(any_backend):
    y = forward(init_network(), np.array([1.0, 0.5]))
    assert_allclose(y, [0.31682708, 0.69627909], rtol=1e-7)
    batch = forward(init_network(), np.array([[1.0, 0.5], [1.0, 0.5]]))
    assert_allclose(batch, [[0.31682708, 0.69627909]] * 2, rtol=1e-7)
    assert predict(init_network(), np.array([1.0, 0.5])).sum() == pytest.approx(1.0)


def test_chapter3_network_errors():
    net = init_network()
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        forward(net, np.array([1.0, 0.5, 0.2]))
    del net["b2"]
    with pytest.raises(ValueError, match="no b2"):
        forward(net, np.array([1.0, 0.5]))


def test_book_sample_weights_accuracy(any_backend, mnist_dir, book_weights):
    (_, _), (x_test, t_test) = load_mnist(data_dir=mnist_dir.parent, download=False)
    net = ThreeLayerNet(load_book_params(book_weights))
    assert net.accuracy(x_test, t_test) == 0.9352


def test_two_layer_net_structure():
    net = TwoLayerNet(input_size=784, hidden_size=50, output_size=10, seed=0)
    assert list(net.params) == ["W1", "b1", "W2", "b2"]
    assert list(net.layers) == ["Affine1", "Relu1", "Affine2"]
    assert net.params["W1"].shape == (784, 50) and net.params["b2"].shape == (10,)
    assert net.params["W1"].dtype == np.float64
    assert net.params["W1"].std() == pytest.approx(0.01, rel=0.05)
    assert not net.params["b1"].any()
    # the layers share the parameter arrays, so the book's in-place update reaches them
    assert net.layers["Affine1"].W is net.params["W1"]


def test_seed_reproducible_and_dtype():
    a = TwoLayerNet(20, 5, 3, seed=7, dtype=np.float32)
    b = TwoLayerNet(20, 5, 3, rng=np.random.default_rng(7), dtype=np.float32)
    assert a.params["W1"].dtype == np.float32
    assert np.array_equal(a.params["W1"], b.params["W1"])
    assert not np.array_equal(a.params["W1"], TwoLayerNet(20, 5, 3, seed=8, dtype=np.float32).params["W1"])
    c = TwoLayerNet(20, 5, 3, seed=7, dtype=np.float64)  # the same draws, kept in float64
    np.testing.assert_array_equal(a.params["W1"], c.params["W1"].astype(np.float32))


def _check_gradients(net, x, t, limit):
    numerical = net.numerical_gradient(x, t)
    backprop = net.gradient(x, t)
    diffs = {key: float(np.mean(np.abs(backprop[key] - numerical[key]))) for key in numerical}
    for key, diff in diffs.items():
        assert diff <= limit, f"{key}: mean |backprop - numerical| = {diff:.3e} > {limit:.0e}"
        worst = float(np.max(np.abs(backprop[key] - numerical[key])))  # one wrong element shows here
        assert worst <= limit, f"{key}: max |backprop - numerical| = {worst:.3e} > {limit:.0e}"
    return diffs


def test_gradient_check_random(any_backend, rng):
    net = TwoLayerNet(12, 6, 4, weight_init_std=0.5, seed=1)
    x = rng.standard_normal((5, 12))
    t = rng.integers(0, 4, 5)
    _check_gradients(net, x, t, 1e-6)
    _check_gradients(net, x, np.eye(4)[t], 1e-6)


def test_gradient_check_sigmoid_and_deep(any_backend, rng):
    net = MultiLayerNet(10, [7, 5], 3, activation="sigmoid", weight_init_std=0.8, seed=2)
    assert list(net.layers) == ["Affine1", "Sigmoid1", "Affine2", "Sigmoid2", "Affine3"]
    x = rng.standard_normal((4, 10))
    _check_gradients(net, x, rng.integers(0, 3, 4), 1e-6)


def test_gradient_check_mnist_book(any_backend, mnist_dir):
    """The book's gradient_check.py: first three training images, TwoLayerNet(784, 50, 10)."""
    (x_train, t_train), _ = load_mnist(normalize=True, one_hot_label=True, data_dir=mnist_dir.parent,
                                       download=False)
    net = TwoLayerNet(input_size=784, hidden_size=50, output_size=10, seed=0)
    x, t = x_train[:3], t_train[:3]
    # numerical gradient of the 784x50 W1 takes ~80k losses: check the others fully,
    # and W1 on the columns the three images touch (every other column is exactly zero)
    backprop = net.gradient(x, t)
    from fastnet.gradient import numerical_gradient

    for key in ("b1", "W2", "b2"):
        num = numerical_gradient(lambda _: net.loss(x, t), net.params[key])
        assert np.mean(np.abs(backprop[key] - num)) <= 1e-6, key  # as the book prints it
        assert np.max(np.abs(backprop[key] - num)) <= 1e-6, key
    rows = np.flatnonzero(x.any(axis=0))[:40]
    W1 = net.params["W1"]
    sub = W1[rows]
    num = np.zeros_like(sub)
    for k, r in enumerate(rows):
        for j in range(W1.shape[1]):
            old = W1[r, j]
            W1[r, j] = old + 1e-4
            hi = net.loss(x, t)
            W1[r, j] = old - 1e-4
            lo = net.loss(x, t)
            W1[r, j] = old
            num[k, j] = (hi - lo) / 2e-4
    assert np.mean(np.abs(backprop["W1"][rows] - num)) <= 1e-6
    assert np.max(np.abs(backprop["W1"][rows] - num)) <= 1e-6
    assert np.array_equal(W1[rows], sub)


def test_book_training_loop_unchanged(any_backend, rng):
    """Chapter 5's train_neuralnet.py loop, only the imports pointed at fastnet."""
    x_train = rng.random((300, 784))
    t_train = np.eye(10)[rng.integers(0, 10, 300)]
    network = TwoLayerNet(input_size=784, hidden_size=50, output_size=10, seed=3)
    iters_num, train_size, batch_size, learning_rate = 60, x_train.shape[0], 100, 0.1
    train_loss_list = []
    batches = np.random.default_rng(0)
    for _ in range(iters_num):
        batch_mask = batches.choice(train_size, batch_size)
        x_batch = x_train[batch_mask]
        t_batch = t_train[batch_mask]
        grad = network.gradient(x_batch, t_batch)
        for key in ("W1", "b1", "W2", "b2"):
            network.params[key] -= learning_rate * grad[key]
        loss = network.loss(x_batch, t_batch)
        train_loss_list.append(loss)
    assert train_loss_list[0] > train_loss_list[-1]
    predicted = np.argmax(network.predict(x_train), axis=1)
    assert network.accuracy(x_train, t_train) == np.mean(predicted == np.argmax(t_train, axis=1))


def test_nan_input_is_reported(rng):
    net = TwoLayerNet(4, 3, 2, seed=0)
    x = rng.standard_normal((2, 4))
    x[1, 2] = np.nan
    with pytest.raises(FloatingPointError, match=r"input x contains nan at index \(1, 2\)"):
        net.loss(x, np.array([0, 1]))


def test_diverged_params_are_reported(rng):
    net = TwoLayerNet(4, 3, 2, seed=0)
    net.params["W2"][0, 0] = np.inf
    with pytest.raises(FloatingPointError, match="parameter W2"):
        net.loss(rng.standard_normal((2, 4)), np.array([0, 1]))


def test_net_input_errors():
    net = TwoLayerNet(4, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(4, 3\)"):
        net.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="out of range"):
        net.loss(np.zeros((2, 4)), np.array([0, 2]))
    with pytest.raises(TypeError, match="real numbers"):
        net.predict(np.array([["a"] * 4]))
    with pytest.raises(ValueError, match="float32 or float64"):
        TwoLayerNet(4, 3, 2, dtype=np.int32)


def test_float32_net_accepts_float64_input(any_backend):
    net = TwoLayerNet(4, 3, 2, seed=0, dtype=np.float32)
    assert net.predict(np.zeros((2, 4))).dtype == np.float32


def test_weight_decay_is_the_books(any_backend, rng):
    """Chapter 6's MultiLayerNet(weight_decay_lambda=...): the loss gains 0.5 * lambda *
    sum(W**2) over every W (not the biases), each W's gradient lambda * W; backprop agrees
    with the numerical gradient of that loss, on two and three layers."""
    x, t = rng.standard_normal((6, 8)), rng.integers(0, 3, 6)
    for hidden in ([5], [5, 4]):
        plain = MultiLayerNet(8, hidden, 3, weight_init_std=0.5, seed=3)
        decayed = MultiLayerNet(8, hidden, 3, "relu", 0.5, 0.1, seed=3)  # the book's positional order
        for key in plain.params:
            decayed.params[key][...] = plain.params[key] + 0.1  # biases too: they must not decay
        for key in plain.params:
            plain.params[key][...] = decayed.params[key]
        squares = sum(float(np.sum(decayed.params[k] ** 2)) for k in decayed.params if k.startswith("W"))
        assert decayed.loss(x, t) == pytest.approx(plain.loss(x, t) + 0.05 * squares, rel=1e-12)
        g_plain, g_decayed = plain.gradient(x, t), decayed.gradient(x, t)
        for key in plain.params:
            extra = 0.1 * decayed.params[key] if key.startswith("W") else 0.0
            np.testing.assert_allclose(g_decayed[key], g_plain[key] + extra, rtol=1e-12, atol=1e-15, err_msg=key)
        _check_gradients(decayed, x, t, 1e-6)


def test_weight_decay_refused_when_not_a_number():
    with pytest.raises(ValueError, match="weight_decay_lambda must be a finite number >= 0, got -1"):
        MultiLayerNet(4, [3], 2, weight_decay_lambda=-1)


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_copies_keep_params_as_views_of_one_vector(how):
    """params and the Affine layers are views of net.flat_params(); a copy or an unpickled
    net is bound again to a vector of its own, so the engine trains what params show."""
    import copy
    import pickle

    net = MultiLayerNet(12, [7, 5], 3, seed=0, weight_init_std=0.3)
    other = {"deepcopy": copy.deepcopy, "copy": copy.copy,
             "pickle": lambda n: pickle.loads(pickle.dumps(n))}[how](net)
    theta = other.flat_params()
    assert theta is not net.flat_params()
    for i in range(1, 4):
        W = other.params[f"W{i}"]
        assert np.shares_memory(W, theta) and other.layers[f"Affine{i}"].W is W
        np.testing.assert_array_equal(W, net.params[f"W{i}"])
    theta += 1.0
    np.testing.assert_array_equal(other.params["b3"], net.params["b3"] + 1.0)
