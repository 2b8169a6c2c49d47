"""The worked numbers of chapters 3 and 4, on every backend."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fastnet.functions import (
    cross_entropy_error,
    identity_function,
    relu,
    relu_grad,
    sigmoid,
    sigmoid_grad,
    softmax,
    step_function,
    sum_squared_error,
)

# the book's two 10-class examples (answer 2): outputs peaking at 2 with 0.6, or at 7
T = [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
Y_GOOD = [0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0]
Y_BAD = [0.1, 0.05, 0.1, 0.0, 0.05, 0.1, 0.0, 0.6, 0.0, 0.0]


def test_step_function(any_backend):
    out = step_function(np.array([-1.0, 1.0, 2.0]))
    assert_array_equal(out, [0, 1, 1])
    assert out.dtype.kind == "i"


def test_sigmoid(any_backend):
    assert_allclose(sigmoid(np.array([-1.0, 1.0, 2.0])), [0.26894142, 0.73105858, 0.88079708], rtol=1e-7)


def test_sigmoid_extremes_without_nan(any_backend):
    with np.errstate(invalid="raise", divide="raise"):
        out = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    assert_array_equal(out, [0.0, 0.5, 1.0])


def test_relu_and_grads(any_backend):
    x = np.array([[-1.0, 0.0, 2.0]])
    assert_array_equal(relu(x), [[0.0, 0.0, 2.0]])
    assert_array_equal(relu_grad(x), [[0.0, 1.0, 1.0]])  # the book: x >= 0
    s = sigmoid(1.0)
    assert_allclose(sigmoid_grad(np.array([1.0])), [(1 - s) * s])


def test_identity():
    x = np.array([1.0, -2.0])
    assert identity_function(x) is x


def test_softmax_book_values(any_backend):
    y = softmax(np.array([0.3, 2.9, 4.0]))
    assert_allclose(y, [0.01821127, 0.24519181, 0.73659691], rtol=1e-6)
    assert y.sum() == pytest.approx(1.0)


def test_softmax_no_overflow(any_backend):
    y = softmax(np.array([1010.0, 1000.0, 990.0]))
    assert np.isfinite(y).all()
    assert_allclose(y, [9.99954600e-01, 4.53978686e-05, 2.06106005e-09], rtol=1e-6)


def test_softmax_rows_and_float32(any_backend):
    x = np.array([[0.3, 2.9, 4.0], [1010.0, 1000.0, 990.0]], dtype=np.float32)
    y = softmax(x)
    assert y.dtype == np.float32
    assert_allclose(y.sum(axis=1), [1, 1], rtol=1e-6)
    assert_allclose(y[0], [0.01821127, 0.24519181, 0.73659691], rtol=1e-5)


def test_softmax_nan_stays_visible(any_backend):
    y = softmax(np.array([[1.0, np.nan, 2.0], [1.0, 2.0, 3.0]]))
    assert np.isnan(y[0]).all()
    assert np.isfinite(y[1]).all()


def test_sum_squared_error_book(any_backend):
    assert sum_squared_error(np.array(Y_GOOD), np.array(T)) == pytest.approx(0.0975)
    assert sum_squared_error(np.array(Y_BAD), np.array(T)) == pytest.approx(0.5975)


def test_cross_entropy_book(any_backend):
    assert cross_entropy_error(np.array(Y_GOOD), np.array(T)) == pytest.approx(0.510825457, rel=1e-6)
    assert cross_entropy_error(np.array(Y_BAD), np.array(T)) == pytest.approx(2.302584092, rel=1e-6)


def test_cross_entropy_labels_equal_onehot(any_backend):
    y = np.array([Y_GOOD, Y_BAD])
    onehot = np.array([T, T])
    assert cross_entropy_error(y, onehot) == pytest.approx(cross_entropy_error(y, np.array([2, 2])))
    assert cross_entropy_error(np.array(Y_GOOD), 2) == pytest.approx(0.510825457, rel=1e-6)


def test_cross_entropy_bad_labels():
    y = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="out of range for 3 classes"):
        cross_entropy_error(y, np.array([0, 3]))
    with pytest.raises(TypeError, match="integer dtype"):
        cross_entropy_error(y, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        cross_entropy_error(y, np.array([0, 1, 2]))


def test_wrong_dtype_is_refused():
    with pytest.raises(TypeError, match="real numbers"):
        sigmoid(np.array(["a", "b"]))
    with pytest.raises(TypeError, match="real numbers"):
        softmax(np.array([1 + 2j]))


def test_integer_input_computed_in_float64(any_backend):
    assert sigmoid(np.array([0])).dtype == np.float64
