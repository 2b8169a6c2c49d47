"""Chapter 5: the computational-graph nodes and the network layers."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fastnet.layers import AddLayer, Affine, MulLayer, Relu, Sigmoid, SoftmaxWithLoss


def test_buy_apple():
    apple, apple_num, tax = 100, 2, 1.1
    mul_apple_layer, mul_tax_layer = MulLayer(), MulLayer()
    apple_price = mul_apple_layer.forward(apple, apple_num)
    price = mul_tax_layer.forward(apple_price, tax)
    assert price == pytest.approx(220)
    dapple_price, dtax = mul_tax_layer.backward(1)
    dapple, dapple_num = mul_apple_layer.backward(dapple_price)
    assert (dapple, dapple_num, dtax) == pytest.approx((2.2, 110, 200))


def test_buy_apple_orange():
    apple, apple_num, orange, orange_num, tax = 100, 2, 150, 3, 1.1
    mul_apple, mul_orange, add, mul_tax = MulLayer(), MulLayer(), AddLayer(), MulLayer()
    apple_price = mul_apple.forward(apple, apple_num)
    orange_price = mul_orange.forward(orange, orange_num)
    all_price = add.forward(apple_price, orange_price)
    price = mul_tax.forward(all_price, tax)
    assert price == pytest.approx(715)
    dall_price, dtax = mul_tax.backward(1)
    dapple_price, dorange_price = add.backward(dall_price)
    dorange, dorange_num = mul_orange.backward(dorange_price)
    dapple, dapple_num = mul_apple.backward(dapple_price)
    assert (dapple_num, dapple, dorange, dorange_num, dtax) == pytest.approx((110, 2.2, 3.3, 165, 650))


def test_relu_layer(any_backend):
    layer = Relu()
    x = np.array([[1.0, -0.5], [-2.0, 3.0]])
    assert_allclose(layer.forward(x), [[1.0, 0.0], [0.0, 3.0]])
    assert layer.mask.tolist() == [[False, True], [True, False]]
    assert_allclose(layer.backward(np.ones((2, 2))), [[1.0, 0.0], [0.0, 1.0]])


def test_sigmoid_layer(any_backend):
    layer = Sigmoid()
    y = layer.forward(np.array([[0.0, 2.0]]))
    assert_allclose(layer.backward(np.array([[1.0, 1.0]])), y * (1 - y))


def test_affine_nd_input_restores_shape(any_backend, rng):
    W, b = rng.standard_normal((12, 5)), rng.standard_normal(5)
    layer = Affine(W, b)
    x = rng.standard_normal((4, 3, 2, 2))
    out = layer.forward(x)
    assert_allclose(out, x.reshape(4, 12) @ W + b)
    dout = rng.standard_normal((4, 5))
    dx = layer.backward(dout)
    assert dx.shape == x.shape
    assert_allclose(dx.reshape(4, 12), dout @ W.T)
    assert_allclose(layer.dW, x.reshape(4, 12).T @ dout)
    assert_allclose(layer.db, dout.sum(axis=0))
    assert layer.backward(dout, need_dx=False) is None
    assert_allclose(layer.dW, x.reshape(4, 12).T @ dout)


def test_affine_shape_error_names_both_shapes():
    layer = Affine(np.zeros((784, 50)), np.zeros(50))
    with pytest.raises(ValueError, match=r"\(3, 785\).*\(784, 50\)"):
        layer.forward(np.zeros((3, 785)))


def test_softmax_with_loss_labels_and_onehot(any_backend, rng):
    x = rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    onehot = np.eye(4)[labels]
    a, b = SoftmaxWithLoss(), SoftmaxWithLoss()
    assert a.forward(x, labels) == pytest.approx(b.forward(x, onehot))
    y = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    assert a.forward(x, labels) == pytest.approx(-np.mean(np.log(y[np.arange(5), labels] + 1e-7)))
    assert_allclose(a.backward(), (y - onehot) / 5)
    assert_allclose(b.backward(), (y - onehot) / 5)
    assert_allclose(a.backward(2.0), 2 * (y - onehot) / 5)


def test_softmax_with_loss_bad_labels():
    layer = SoftmaxWithLoss()
    with pytest.raises(ValueError, match="out of range"):
        layer.forward(np.zeros((2, 3)), np.array([0, 5]))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        layer.forward(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match="integer labels t must have an integer dtype, got <U1"):
        layer.forward(np.zeros((2, 3)), np.array(["a", "b"]))
