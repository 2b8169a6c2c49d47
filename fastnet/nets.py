"""The book's networks.

* :class:`MultiLayerNet` — a sequential net of any depth: ``Affine → activation → … →
  Affine → SoftmaxWithLoss``, built from :mod:`fastnet.layers`.
* :class:`TwoLayerNet` — the chapter-4/5 network, a ``MultiLayerNet`` with one hidden
  layer: ``params`` (``W1 b1 W2 b2``), an ordered ``layers`` mapping (``Affine1``,
  ``Relu1``, ``Affine2``), ``lastLayer``, ``predict``, ``loss``, ``accuracy``,
  ``numerical_gradient`` and ``gradient`` exactly as the book uses them.
* Chapter 3: :func:`init_network`, :func:`forward`, :func:`predict` and
  :class:`ThreeLayerNet`, inference with any dict of weights ``W1, b1, …, Wn, bn``
  (sigmoid hidden layers; identity or softmax output), e.g. the book's
  ``sample_weight.pkl`` (see :func:`fastnet.io.load_book_params`).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import gradient as _gradient
from ._validate import as_float_array, describe_nonfinite, float_dtype, labels
from .backend import get_backend, kernels
from .kernels.contract import Act, mlp_size, mlp_views
from .layers import Affine, Relu, Sigmoid, SoftmaxWithLoss

__all__ = ["MultiLayerNet", "TwoLayerNet", "ThreeLayerNet", "init_network", "forward", "predict"]

ACTIVATIONS = {"relu": Relu, "sigmoid": Sigmoid}
_FUSED = {Relu: "affine_relu", Sigmoid: "affine_sigmoid"}
#: rows per chunk when a whole data set goes through ``predict`` for accuracy
EVAL_BATCH = 2000


def _rng(seed=None, rng=None) -> np.random.Generator:
    if rng is not None and seed is not None:
        raise ValueError("give either seed or rng, not both")
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return rng
    return np.random.default_rng(seed)


def _init_scale(weight_init_std, activation: str, fan_in: int) -> float:
    if isinstance(weight_init_std, str):
        key = weight_init_std.lower()
        if key in ("relu", "he"):
            return float(np.sqrt(2.0 / fan_in))
        if key in ("sigmoid", "xavier"):
            return float(np.sqrt(1.0 / fan_in))
        raise ValueError(f"weight_init_std must be a number, 'he' or 'xavier'; got {weight_init_std!r}")
    return float(weight_init_std)


def _batch_rows(x, dtype, width):
    """A batch as the MLP kernels take it: 2-D rows of ``width`` in ``dtype`` (uint8
    pixels as they are), C-contiguous."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = as_float_array(x, dtype=dtype)
    rows = x.reshape(x.shape[0] if x.ndim else 1, -1)
    if rows.shape[1] != width:
        raise ValueError(f"x has shape {x.shape} but the net takes {width} inputs per row")
    return np.ascontiguousarray(rows)


class MultiLayerNet:
    """Sequential net: ``(Affine → activation) × len(hidden_size_list) → Affine → softmax``.

    Parameters follow the book's ``MultiLayerNet``: ``input_size``, ``hidden_size_list``,
    ``output_size``, ``activation`` ('relu' or 'sigmoid'), ``weight_init_std`` (a
    number, or 'he'/'xavier') and ``weight_decay_lambda`` (chapter 6: the loss gains
    ``0.5 * lambda * sum(W**2)`` over every weight matrix, each weight's gradient
    ``lambda * W``; biases are not decayed).  fastnet adds ``dtype`` (float64 as in the
    book, or float32) and ``seed``/``rng`` for reproducible initial weights.

    Weights are drawn as ``weight_init_std * standard_normal`` and biases are zero.
    ``params`` and the Affine layers' ``W`` and ``b`` are views of one flat vector
    (:meth:`flat_params`), which the compiled MLP kernels train in place.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size_list,
        output_size: int,
        activation: str = "relu",
        weight_init_std=0.01,
        weight_decay_lambda=0.0,
        *,
        dtype=np.float64,
        seed=None,
        rng=None,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.weight_decay_lambda = float(weight_decay_lambda)
        if not (self.weight_decay_lambda >= 0 and np.isfinite(self.weight_decay_lambda)):
            raise ValueError(f"weight_decay_lambda must be a finite number >= 0, got {weight_decay_lambda!r}")
        sizes = [int(input_size), *(int(h) for h in hidden_size_list), int(output_size)]
        if min(sizes) < 1:
            raise ValueError(f"layer sizes must be positive, got {sizes}")
        self.dtype = float_dtype(dtype)
        self.activation = activation
        self.sizes = sizes
        gen = _rng(seed, rng)
        self._theta = np.zeros(mlp_size(sizes), self.dtype)
        self.params = self._views(self._theta)
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            scale = _init_scale(weight_init_std, activation, fan_in)
            self.params[f"W{i}"][...] = scale * gen.standard_normal((fan_in, fan_out))
        self.layers = OrderedDict()
        n = self.n_affine
        for i in range(1, n + 1):
            self.layers[f"Affine{i}"] = Affine(self.params[f"W{i}"], self.params[f"b{i}"])
            if i < n:
                name = "Relu" if activation == "relu" else "Sigmoid"
                self.layers[f"{name}{i}"] = ACTIVATIONS[activation]()
        self.lastLayer = SoftmaxWithLoss()
        self._bound = dict(self.params)

    # --------------------------------------------------------------- structure
    @property
    def n_affine(self) -> int:
        return len(self.sizes) - 1

    @property
    def act_code(self) -> int:
        """The kernels' code of the hidden activation (contract.Act)."""
        return int(Act[self.activation.upper()])

    def _views(self, theta) -> dict:
        """``{W1: ..., b1: ..., ...}``: the views of ``theta`` in the engine's layout."""
        return {f"{name}{i}": a for i, pair in enumerate(mlp_views(self.sizes, theta), start=1)
                for name, a in zip("Wb", pair)}

    def flat_params(self) -> np.ndarray:
        """The parameters as one vector ``W1, b1, W2, b2, ...`` (row-major), whose views
        are ``params`` and the Affine layers' ``W`` and ``b``: a change to either is a
        change to the other.  When a ``params`` entry was replaced by another array (as
        the book's code may do), the vector is rebuilt from ``params`` and everything is
        bound to it again; the shapes must still chain."""
        theta = self._theta
        if all(self.params.get(k) is v for k, v in self._bound.items()):
            return theta
        shapes = {}
        for i in range(1, self.n_affine + 1):
            for name in "Wb":
                key = f"{name}{i}"
                if key not in self.params:
                    raise ValueError(f"params has no {key}")
                shapes[key] = np.shape(self.params[key])
        for i in range(1, self.n_affine + 1):
            W, b = shapes[f"W{i}"], shapes[f"b{i}"]
            want = (self.sizes[i - 1], self.sizes[i])
            if W != want:
                if len(W) == 2 and i > 1 and W[0] != shapes[f"W{i - 1}"][-1]:
                    raise ValueError(f"params W{i} has shape {W} but W{i - 1} has shape {shapes[f'W{i - 1}']}: "
                                     "the layers do not chain")
                raise ValueError(f"params W{i} has shape {W}; this net's layer {i} is {want}")
            if b != (want[1],):
                raise ValueError(f"params b{i} has shape {b} but W{i} has shape {W}")
        theta = np.empty_like(self._theta)
        views = self._views(theta)
        for key, view in views.items():
            view[...] = as_float_array(self.params[key], key, dtype=self.dtype)
        self._bind(theta)
        return theta

    def __copy__(self):
        """A whole copy: a shallow one would share the layers and the vector of views."""
        import copy

        return copy.deepcopy(self)

    def __setstate__(self, state) -> None:
        """After pickle or copy: a view does not survive them (each array comes back on its
        own), so ``params`` and the layers are bound to one vector again."""
        self.__dict__.update(state)
        theta = np.empty_like(self._theta)
        for key, view in self._views(theta).items():
            view[...] = self.params[key]
        self._bind(theta)

    def _bind(self, theta) -> None:
        self._theta = theta
        views = self._views(theta)
        self.params.update(views)
        for i in range(1, self.n_affine + 1):
            affine = self.layers[f"Affine{i}"]
            affine.W, affine.b = views[f"W{i}"], views[f"b{i}"]
        self._bound = dict(views)

    def _compiled(self) -> bool:
        """Whether the fused MLP kernels serve ``gradient`` and ``accuracy`` (the compiled
        backends; the reference backend keeps the book's layer-by-layer path)."""
        return get_backend() != "numpy"

    def set_params(self, params) -> None:
        """Copy ``params`` (a dict ``W1, b1, …``) into this net's arrays, checking shapes."""
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise ValueError(f"parameters {', '.join(missing)} are missing")
        for key, current in self.params.items():
            new = as_float_array(params[key], key)
            if new.shape != current.shape:
                raise ValueError(f"{key} has shape {new.shape}, this net needs {current.shape}")
            current[...] = new

    # --------------------------------------------------------------- the book's API
    def predict(self, x):
        """Scores (before softmax) for a batch ``x`` of shape ``(N, input_size)`` or ``(N, …)``.

        An Affine layer followed by its activation runs as one fused kernel; both layers
        keep the state their ``backward`` needs.
        """
        layers = list(self.layers.values())
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if type(layer) is Affine and type(nxt) in _FUSED:
                x = layer.forward(x, _FUSED[type(nxt)])
                nxt.out = x
                i += 2
            else:
                x = layer.forward(x)
                i += 1
        return x

    def loss(self, x, t):
        """Mean cross-entropy of ``softmax(predict(x))`` against ``t`` (one-hot or labels)."""
        y = self.predict(x)
        value = self.lastLayer.forward(y, t)
        if not np.isfinite(value):
            self._explain_nonfinite(x)
        if self.weight_decay_lambda:
            value += self.weight_decay()
        return value

    def weight_decay(self) -> float:
        """The loss's weight-decay term, ``0.5 * lambda * sum(W**2)`` over every W."""
        lam = self.weight_decay_lambda
        return sum(0.5 * lam * float(np.sum(np.square(self.params[f"W{i}"], dtype=np.float64)))
                   for i in range(1, self.n_affine + 1))

    def _explain_nonfinite(self, x):
        problem = describe_nonfinite(np.asarray(x, dtype=float), "the input x")
        if problem is None:
            for key, value in self.params.items():
                problem = describe_nonfinite(value, f"parameter {key}")
                if problem:
                    problem += " (training diverged: try a smaller learning rate)"
                    break
        raise FloatingPointError(f"the loss is not finite: {problem or 'unknown cause'}")

    def accuracy(self, x, t, batch_size: int = EVAL_BATCH):
        """Fraction of rows whose highest score is the label (``t`` one-hot or labels).

        Runs ``predict`` in chunks of ``batch_size`` rows so a whole data set fits in
        cache and memory.
        """
        n = len(x)
        t = labels(t, n, self.sizes[-1], one_hot=True)
        if n == 0:
            raise ValueError("accuracy of an empty batch is undefined")
        if self._compiled():  # one kernel call: predict_mlp labels every row
            predicted = np.empty(n, np.int64)
            kernels().predict_mlp(_batch_rows(x, self.dtype, self.sizes[0]), self.sizes, self.act_code,
                                  self.flat_params(), predicted)
            return int(np.count_nonzero(predicted == t)) / float(n)
        correct = 0
        for start in range(0, n, batch_size):
            y = self.predict(x[start : start + batch_size])
            correct += int(np.sum(np.argmax(y, axis=1) == t[start : start + batch_size]))
        return correct / float(n)

    def numerical_gradient(self, x, t):
        """The book's gradient by central differences of ``loss`` for every parameter.

        On the reference backend this is the book's loop; on the compiled backends the
        net, of any depth, evaluates the same two losses per parameter but recomputes only
        what that parameter changes (:func:`fastnet.gradient.numerical_gradient_net`).
        """
        return _gradient.numerical_gradient_net(self, x, t)

    def gradient(self, x, t):
        """The gradient of ``loss`` by backpropagation: ``{W1: dW1, b1: db1, ...}``.

        On the compiled backends the whole net's forward and backward run in one kernel
        call (``mlp_gradient``); the result is the same up to rounding, in new arrays,
        and ``lastLayer.loss`` is set as the layers would set it.  On the reference
        backend it is the book's loop: forward, ``lastLayer.backward(1)``, then every
        layer's ``backward`` in reverse order (the first Affine layer skips ``dx``,
        which nothing uses).
        """
        if self._compiled():
            return self._fused_gradient(x, t)
        self.loss(x, t)
        dout = self.lastLayer.backward(1)
        layers = list(self.layers.values())
        layers.reverse()
        for layer in layers[:-1]:
            dout = layer.backward(dout)
        first = layers[-1]
        if isinstance(first, Affine):
            first.backward(dout, need_dx=False)
        else:
            first.backward(dout)
        grads = {}
        lam = self.dtype.type(self.weight_decay_lambda)
        for i in range(1, self.n_affine + 1):
            affine = self.layers[f"Affine{i}"]
            grads[f"W{i}"] = affine.dW + lam * affine.W if lam else affine.dW
            grads[f"b{i}"] = affine.db
        return grads

    def _fused_gradient(self, x, t):
        rows = _batch_rows(x, self.dtype, self.sizes[0])
        t = labels(t, rows.shape[0], self.sizes[-1], one_hot=True)
        theta = self.flat_params()
        grad = np.empty_like(theta)
        batch = np.arange(rows.shape[0], dtype=np.int64)
        loss = kernels().mlp_gradient(rows, t, batch, self.sizes, self.act_code, theta, self.weight_decay_lambda,
                                      grad)
        if not np.isfinite(loss):
            self._explain_nonfinite(x)
        self.lastLayer.loss = loss - self.weight_decay() if self.weight_decay_lambda else loss
        return self._views(grad)


class TwoLayerNet(MultiLayerNet):
    """The book's two-layer net: ``Affine1 → Relu1 → Affine2 → SoftmaxWithLoss``.

    ``TwoLayerNet(input_size, hidden_size, output_size, weight_init_std=0.01)`` as in
    chapters 4 and 5, plus the keyword-only ``activation``, ``dtype``, ``seed``, ``rng``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        weight_init_std=0.01,
        *,
        activation: str = "relu",
        dtype=np.float64,
        seed=None,
        rng=None,
    ):
        super().__init__(
            input_size,
            [hidden_size],
            output_size,
            activation=activation,
            weight_init_std=weight_init_std,
            dtype=dtype,
            seed=seed,
            rng=rng,
        )


# ------------------------------------------------------------------- chapter 3
def init_network():
    """The chapter-3 toy network (2 inputs, hidden layers of 3 and 2, 2 outputs)."""
    return {
        "W1": np.array([[0.1, 0.3, 0.5], [0.2, 0.4, 0.6]]),
        "b1": np.array([0.1, 0.2, 0.3]),
        "W2": np.array([[0.1, 0.4], [0.2, 0.5], [0.3, 0.6]]),
        "b2": np.array([0.1, 0.2]),
        "W3": np.array([[0.1, 0.3], [0.2, 0.4]]),
        "b3": np.array([0.1, 0.2]),
    }


def _layer_params(network) -> list[tuple[np.ndarray, np.ndarray]]:
    n = 0
    while f"W{n + 1}" in network:
        n += 1
    if n == 0:
        raise ValueError(f"network has no W1; its keys are {sorted(network)}")
    pairs = []
    dtypes = set()
    for i in range(1, n + 1):
        if f"b{i}" not in network:
            raise ValueError(f"network has W{i} but no b{i}")
        W, b = np.asarray(network[f"W{i}"]), np.asarray(network[f"b{i}"])
        if W.ndim != 2 or b.shape != (W.shape[1],):
            raise ValueError(f"W{i} {W.shape} and b{i} {b.shape} do not form a layer")
        if pairs and pairs[-1][0].shape[1] != W.shape[0]:
            raise ValueError(f"W{i - 1} {pairs[-1][0].shape} does not feed W{i} {W.shape}")
        pairs.append((W, b))
        dtypes.update((W.dtype, b.dtype))
    if len(dtypes) != 1 or next(iter(dtypes)).kind != "f":
        raise TypeError(f"the weights must share one float dtype, got {sorted(map(str, dtypes))}")
    return pairs


def forward(network, x, output: str = "identity"):
    """Chapter 3's ``forward``: sigmoid hidden layers, then ``identity`` or ``softmax``.

    ``network`` is any dict of weights ``W1, b1, …, Wn, bn``; ``x`` is one sample (1-D)
    or a batch (2-D).
    """
    if output not in ("identity", "softmax"):
        raise ValueError(f"output must be 'identity' or 'softmax', got {output!r}")
    pairs = _layer_params(network)
    dtype = pairs[0][0].dtype
    x = as_float_array(x, dtype=dtype)
    single = x.ndim == 1
    a = x.reshape(1, -1) if single else x.reshape(x.shape[0], -1)
    if a.shape[1] != pairs[0][0].shape[0]:
        raise ValueError(f"x has shape {x.shape} but W1 has shape {pairs[0][0].shape}")
    k = kernels()
    for i, (W, b) in enumerate(pairs):
        out = np.empty((a.shape[0], W.shape[1]), dtype)
        last = i == len(pairs) - 1
        (k.affine if last else k.affine_sigmoid)(a, W, b, out)
        a = out
    if output == "softmax":
        a = k.softmax(a, np.empty_like(a))
    return a[0] if single else a


def predict(network, x):
    """Chapter 3's ``predict`` for MNIST: ``forward`` with a softmax output."""
    return forward(network, x, output="softmax")


class ThreeLayerNet:
    """Inference with a chapter-3 weight dict (``W1..b3``, or any depth), e.g. the book's.

    >>> net = ThreeLayerNet(fastnet.io.load_book_params("sample_weight.pkl"))
    >>> net.accuracy(x_test, t_test)   # 0.9352 on MNIST, as the book prints
    """

    def __init__(self, params, output: str = "softmax"):
        _layer_params(params)  # validate once
        self.params = params
        self.output = output

    def predict(self, x):
        return forward(self.params, x, output=self.output)

    forward = predict

    def accuracy(self, x, t, batch_size: int = 100):
        t = labels(t, len(x), _layer_params(self.params)[-1][0].shape[1], one_hot=True)
        correct = 0
        for start in range(0, len(x), batch_size):
            y = self.predict(x[start : start + batch_size])
            correct += int(np.sum(np.argmax(y, axis=1) == t[start : start + batch_size]))
        return correct / float(len(x))
