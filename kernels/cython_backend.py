"""The Cython backend: the compiled extension ``fastnet.kernels._cython``.

Importing this module fails with ImportError when the extension was not built;
:mod:`fastnet.backend` turns that into an error that says how to build it.
"""

from ._cython import (  # noqa: F401  (the kernel table)
    NAME,
    affine,
    affine_backward,
    affine_relu,
    affine_sigmoid,
    cross_entropy_labels,
    cross_entropy_onehot,
    get_num_threads,
    mlp_gradient,
    numerical_gradient_mlp,
    predict_mlp,
    relu,
    relu_backward,
    set_num_threads,
    sigmoid,
    sigmoid_backward,
    softmax,
    softmax_loss_backward_labels,
    softmax_loss_backward_onehot,
    softmax_loss_labels,
    softmax_loss_onehot,
    sparse_affine,
    sparse_predict_mlp,
    sparse_rows,
    step,
    sum_squared_error,
    train_steps_mlp,
    train_steps_mlp_sparse,
)


def warmup(dtypes=None):
    """Nothing to compile: the Cython kernels are compiled at build time."""
    return 0.0
