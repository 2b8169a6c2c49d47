"""The kernel contract: the one list of kernels every backend implements.

Every backend module (``reference``, ``numba_backend``, ``cython_backend``) defines
each name below with the same argument order.  The layer API calls kernels only
through the active table (:func:`fastnet.backend.kernels`), never a backend by name.

Conventions shared by every kernel
----------------------------------
* Arrays are 2-D ``(rows, cols)``; 1-D and N-d data are reshaped by the caller.
* ``x``, ``W``, ``b``, ``out`` … are all of one float dtype, ``float32`` or
  ``float64``.  A kernel never mixes dtypes: a mismatch is the caller's bug and the
  compiled backends raise ``TypeError`` for it.
* Integer labels ``t`` are 1-D ``int64`` in ``[0, classes)``; one-hot labels are 2-D
  float arrays of the same dtype as the scores.  Every kernel that indexes by a label
  checks it first (O(rows)) and raises ``ValueError`` naming the label: no input may
  make a kernel read or write outside its arrays.
* ``out`` / ``dx`` / ``dW`` / ``db`` are caller-provided, C-contiguous, written in
  place and also returned.  Inputs may be non-contiguous (the compiled wrappers make
  a contiguous copy only when they must).
* Numerics follow the book: softmax subtracts the row maximum, cross-entropy adds
  ``1e-7`` inside the log and averages over the batch, sum-squared error is
  ``0.5 * sum((y - t)**2)`` (not averaged).  NaN and inf propagate: no fast-math.
* Scalar results (losses) are returned as Python ``float``.
"""

from __future__ import annotations

from enum import IntEnum


class Act(IntEnum):
    """The ``act`` argument of every kernel that takes one: a layer's activation."""

    IDENTITY = 0
    RELU = 1
    SIGMOID = 2


class Opt(IntEnum):
    """``opt[OPT_KIND]`` of the MLP engine: the optimiser applied inside the kernel."""

    SGD = 1  # p -= lr * g
    MOMENTUM = 2  # v = beta1 * v - lr * g; p += v
    ADAGRAD = 3  # h += g * g; p -= lr * g / (sqrt(h) + 1e-7)
    ADAM = 4  # the book's Adam, with its bias-corrected lr_t; m, v in state[0], state[1]


#: The fields of the MLP engine's ``opt`` record (a float64 array of this length).
OPT_KIND, OPT_LR, OPT_BETA1, OPT_BETA2, OPT_DECAY, OPT_ITER = range(6)
OPT_FIELDS = 6

#: name -> (signature, what it computes).  The order is the documentation order.
KERNELS: dict[str, tuple[str, str]] = {
    # element-wise activations
    "step": ("(x, out) -> out", "out = 1 where x > 0 else 0"),
    "sigmoid": ("(x, out) -> out", "out = 1 / (1 + exp(-x))"),
    "sigmoid_backward": ("(dout, y, out) -> out", "out = dout * (1 - y) * y, y = sigmoid output"),
    "relu": ("(x, out) -> out", "out = max(x, 0)"),
    "relu_backward": (
        "(dout, y, out) -> out",
        "out = dout where y > 0 else 0; y = relu input or output (same sign test)",
    ),
    # affine layers (matrix products through BLAS)
    "affine": ("(x, W, b, out) -> out", "out = x @ W + b"),
    "affine_relu": ("(x, W, b, out) -> out", "out = relu(x @ W + b), fused"),
    "affine_sigmoid": ("(x, W, b, out) -> out", "out = sigmoid(x @ W + b), fused"),
    "affine_backward": (
        "(x, W, dout, dW, db, dx=None) -> None",
        "dW = x.T @ dout; db = dout.sum(0); dx = dout @ W.T only when dx is given",
    ),
    # softmax and losses
    "softmax": ("(x, out) -> out", "row-wise softmax, subtracting each row's maximum"),
    "cross_entropy_labels": ("(y, t) -> float", "-mean(log(y[i, t[i]] + 1e-7))"),
    "cross_entropy_onehot": ("(y, t) -> float", "-sum(t * log(y + 1e-7)) / rows"),
    "sum_squared_error": ("(y, t) -> float", "0.5 * sum((y - t) ** 2)"),
    "softmax_loss_labels": (
        "(x, t, y) -> float",
        "y = softmax(x) written in place; returns cross_entropy_labels(y, t)",
    ),
    "softmax_loss_onehot": (
        "(x, t, y) -> float",
        "y = softmax(x) written in place; returns cross_entropy_onehot(y, t)",
    ),
    "softmax_loss_backward_labels": (
        "(y, t, dout, dx) -> dx",
        "dx = (y - onehot(t)) * dout / rows",
    ),
    "softmax_loss_backward_onehot": (
        "(y, t, dout, dx) -> dx",
        "dx = (y - t) * dout / rows",
    ),
    # the MLP engine: a whole net of any depth as a flat parameter vector
    "train_steps_mlp": (
        "(X, T, idx, sizes, act, theta, opt, state, losses) -> int",
        "training steps of the net Affine-act-...-Affine-SoftmaxWithLoss with layer sizes "
        "(int64, D ... C); theta holds W1, b1, W2, b2, ... one after the other, row-major (mlp_views); "
        "step k takes rows idx[k] (idx int64 (S, B)) of X (theta's dtype, or uint8 pixels / 255) "
        "with labels T (int64), writes its loss (+ 0.5 decay sum W**2) to losses[k] (float64, S) "
        "and applies the optimiser of the record opt (float64, OPT_FIELDS: Opt kind, lr, beta1 or "
        "momentum, beta2, weight decay, Adam's iteration, counted in place) with its state "
        "(2, len(theta)) in theta's dtype. Every index and label is checked first; stops after "
        "the first step whose loss is not finite. Returns the number of steps run",
    ),
    "train_steps_mlp_sparse": (
        "(indptr, indices, data, T, idx, sizes, act, theta, opt, state, losses) -> int",
        "train_steps_mlp with X given as CSR rows (sparse_rows); the first layer's product and "
        "its gradient run over the non-zeros only",
    ),
    "mlp_gradient": (
        "(X, T, idx, sizes, act, theta, decay, grad) -> float",
        "the gradient of the loss (+ 0.5 decay sum W**2) of the batch idx (int64, B) of X into "
        "grad (theta's shape and dtype, same layout); returns the loss. theta is not changed",
    ),
    "predict_mlp": (
        "(X, sizes, act, theta, out) -> out",
        "class labels of the net for the rows of X (theta's dtype or uint8 pixels): out[i] = "
        "argmax of row i's scores (the first maximum; a NaN counts as one), out int64 (rows,)",
    ),
    "sparse_predict_mlp": (
        "(indptr, indices, data, row0, sizes, act, theta, out) -> out",
        "predict_mlp for CSR rows row0 : row0 + len(out)",
    ),
    "numerical_gradient_mlp": (
        "(x, t, sizes, act, theta, h, grad) -> None",
        "for every parameter p of theta: (loss(p + h) - loss(p - h)) / 2h, the loss being the "
        "mean cross-entropy of the net's softmax on the batch x (B, D) with int64 labels t (no "
        "weight decay); the compiled backends recompute only the rows and layers that p changes",
    ),
    # the first layer over rows stored sparse (MNIST pixels are about 81% zeros)
    "sparse_rows": (
        "(X) -> (indptr, indices, data)",
        "CSR of the rows of a dense 2-D uint8/float array (new arrays): indptr int64 (rows+1), "
        "indices int32 sorted within each row, data the non-zeros in X's dtype",
    ),
    "sparse_affine": (
        "(indptr, indices, data, row0, W, b, act, out) -> out",
        "out = act(X[row0 : row0 + len(out)] @ W + b) for CSR rows X (data uint8 pixels / 255 "
        "or W's dtype); act 0 identity, 1 relu, 2 sigmoid; the compiled backends touch only "
        "the non-zeros and split the rows between threads",
    ),
}

#: Besides the kernels, every backend module defines these.
CONTROLS: dict[str, tuple[str, str]] = {
    "warmup": ("(dtypes=None) -> float", "compile what the backend compiles on first use; seconds taken"),
    "get_num_threads": ("() -> int", "threads the kernels called from this thread may use"),
    "set_num_threads": (
        "(n) -> None",
        "let the kernels called from this thread use n threads (ValueError below 1); no kernel's "
        "result depends on it",
    ),
}

#: Added to the probability inside every log, as in the book; also AdaGrad's and Adam's
#: epsilon under the square root's sum, as the book's optimisers write it.
LOG_EPS = 1e-7


def mlp_size(sizes) -> int:
    """Length of the flat parameter vector of a net with these layer sizes."""
    return sum(int(a) * int(b) + int(b) for a, b in zip(sizes[:-1], sizes[1:]))


def mlp_views(sizes, theta) -> list:
    """``[(W1, b1), (W2, b2), ...]``: views of the flat vector ``theta`` (its layout)."""
    views, at = [], 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        a, b = int(a), int(b)
        views.append((theta[at : at + a * b].reshape(a, b), theta[at + a * b : at + a * b + b]))
        at += a * b + b
    return views


def missing(table) -> list[str]:
    """Names of the contract that ``table`` (a module or namespace) does not define."""
    return [name for name in (*KERNELS, *CONTROLS) if not callable(getattr(table, name, None))]


def describe() -> str:
    """The contract as a text table (used by ``fastnet backends`` and the docs)."""
    width = max(map(len, (*KERNELS, *CONTROLS)))
    return "\n".join(
        f"{name:<{width}}  {sig:<40}  {what}" for name, (sig, what) in (*KERNELS.items(), *CONTROLS.items())
    )
