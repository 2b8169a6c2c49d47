"""Chapter 4: numerical differentiation and gradient descent, the book's numbers."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fastnet.gradient import gradient_descent, numerical_diff, numerical_gradient


def function_1(x):
    return 0.01 * x**2 + 0.1 * x


def function_2(x):
    return x[0] ** 2 + x[1] ** 2


def test_numerical_diff_book():
    assert numerical_diff(function_1, 5) == pytest.approx(0.2, abs=1e-9)
    assert numerical_diff(function_1, 10) == pytest.approx(0.3, abs=1e-9)


def test_numerical_gradient_book():
    assert_allclose(numerical_gradient(function_2, np.array([3.0, 4.0])), [6.0, 8.0])
    assert_allclose(numerical_gradient(function_2, np.array([0.0, 2.0])), [0.0, 4.0])
    assert_allclose(numerical_gradient(function_2, np.array([3.0, 0.0])), [6.0, 0.0])


def test_numerical_gradient_any_shape():
    x = np.arange(24, dtype=float).reshape(2, 3, 4)
    assert_allclose(numerical_gradient(lambda a: np.sum(a**2), x), 2 * x, atol=1e-6)


def test_numerical_gradient_restores_x_when_f_raises():
    x = np.array([1.0, 2.0, 3.0])
    calls = []

    def f(a):
        calls.append(a.copy())
        if len(calls) == 4:
            raise RuntimeError("boom")
        return a.sum()

    with pytest.raises(RuntimeError, match="boom"):
        numerical_gradient(f, x)
    assert x.tolist() == [1.0, 2.0, 3.0]
    assert calls[2][1] == pytest.approx(2.0001)


def test_numerical_gradient_refuses_integer_arrays():
    with pytest.raises(TypeError, match="float array"):
        numerical_gradient(function_2, np.array([3, 4]))


def test_numerical_gradient_needs_scalar_f():
    with pytest.raises(ValueError, match="scalar"):
        numerical_gradient(lambda a: a * 2, np.array([1.0, 2.0]))


def test_gradient_descent_book():
    init = np.array([-3.0, 4.0])
    x = gradient_descent(function_2, init, lr=0.1, step_num=100)
    assert_allclose(x, [-6.11110793e-10, 8.14814391e-10], rtol=1e-5)
    assert init.tolist() == [-3.0, 4.0]  # not modified


def test_gradient_descent_learning_rates():
    big = gradient_descent(function_2, np.array([-3.0, 4.0]), lr=10.0, step_num=100)
    assert np.abs(big).max() > 1e10  # diverges
    small = gradient_descent(function_2, np.array([-3.0, 4.0]), lr=1e-10, step_num=100)
    assert_allclose(small, [-3.0, 4.0], atol=1e-6)  # barely moves
    assert not np.array_equal(small, [-3.0, 4.0])


def test_gradient_descent_history():
    x, history = gradient_descent(function_2, [-3.0, 4.0], lr=0.1, step_num=20, return_history=True)
    assert history.shape == (20, 2)
    assert_allclose(history[0], [-3.0, 4.0])
    assert_allclose(history[1], [-2.4, 3.2])
