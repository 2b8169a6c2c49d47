"""Numerical differentiation, as in chapter 4 (``common/gradient.py``), and gradient checks.

``numerical_diff`` and ``numerical_gradient`` are the central difference with
``h = 1e-4``; ``gradient_descent`` is the book's loop.  ``numerical_gradient`` works
on arrays of any shape and puts every element of ``x`` back, also when ``f`` raises;
when ``f`` is a Numba-compiled function the loop itself runs compiled.

:func:`numerical_gradient_net` is the same central difference for every parameter of
a sequential net, computed by the active backend: the reference re-runs the whole net
twice per parameter, as the book does; the compiled backends evaluate the same two
losses but recompute only what the one parameter changes (see the kernel
``numerical_gradient_mlp``).  :func:`gradcheck` compares backprop with it.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array, labels

H = 1e-4

__all__ = [
    "numerical_diff",
    "numerical_gradient",
    "gradient_descent",
    "numerical_gradient_net",
    "gradcheck",
    "GradcheckReport",
    "GradcheckError",
]


def numerical_diff(f, x, h: float = H):
    """Central difference ``(f(x + h) - f(x - h)) / 2h``."""
    return (f(x + h) - f(x - h)) / (2 * h)


def _scalar(value, where: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"f must return a scalar, but returned shape {arr.shape} {where}")
    return float(arr.reshape(()))


def numerical_gradient(f, x, h: float = H):
    """Gradient of scalar ``f`` at ``x`` by central differences, one element at a time.

    ``x`` is perturbed in place (``f`` may ignore its argument and read ``x`` through
    a closure, as the book's nets do) and every element is restored afterwards, also
    when ``f`` raises.  ``x`` must be a float array; lists are converted first.
    """
    if not isinstance(x, np.ndarray):
        x = as_float_array(x)
    elif x.dtype.kind != "f":
        raise TypeError(
            f"numerical_gradient perturbs x in place, so x must be a float array; got {x.dtype}"
        )
    if _is_numba_function(f):
        return _numerical_gradient_compiled(f, x, h)
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        idx = it.multi_index
        tmp_val = x[idx]
        try:
            x[idx] = tmp_val + h
            fxh1 = _scalar(f(x), f"at x[{idx}] + h")
            x[idx] = tmp_val - h
            fxh2 = _scalar(f(x), f"at x[{idx}] - h")
        finally:
            x[idx] = tmp_val
        grad[idx] = (fxh1 - fxh2) / (2 * h)
        it.iternext()
    return grad


def gradient_descent(f, init_x, lr: float = 0.01, step_num: int = 100, *, return_history=False):
    """``step_num`` steps of ``x -= lr * numerical_gradient(f, x)`` from ``init_x``.

    Unlike the book, ``init_x`` itself is not modified: the walk starts from a copy.
    With ``return_history=True`` returns ``(x, history)`` like the book's
    ``gradient_method.py`` (the points before each step, shape ``(step_num, *x.shape)``).
    """
    x = np.array(as_float_array(init_x, "init_x"), copy=True)
    history = []
    for _ in range(int(step_num)):
        if return_history:
            history.append(x.copy())
        x -= lr * numerical_gradient(f, x)
    if return_history:
        return x, np.array(history).reshape((len(history),) + x.shape)
    return x


# ------------------------------------------------------------------ compiled f
def _is_numba_function(f) -> bool:
    return type(f).__module__.startswith("numba") and hasattr(f, "py_func")


_compiled_loop = None


def _numerical_gradient_compiled(f, x, h):
    """The book's loop, jitted: ``f`` is called from machine code, no Python per element.

    ``x`` is perturbed in place through a flat view; it is restored from a copy if
    ``f`` raises."""
    global _compiled_loop
    if _compiled_loop is None:
        from numba import njit

        @njit
        def loop(f, x, grad, h):
            flat, g = x.reshape(-1), grad.reshape(-1)
            for i in range(flat.size):
                tmp = flat[i]
                flat[i] = tmp + h
                fxh1 = f(x)
                flat[i] = tmp - h
                fxh2 = f(x)
                flat[i] = tmp
                g[i] = (fxh1 - fxh2) / (2 * h)

        _compiled_loop = loop
    if not x.flags.c_contiguous:
        raise ValueError("a Numba-compiled f needs a C-contiguous x (use np.ascontiguousarray)")
    backup = x.copy()
    grad = np.zeros_like(x)
    try:
        _compiled_loop(f, x, grad, float(h))
    except BaseException:
        x[...] = backup
        raise
    return grad


# ------------------------------------------------------------------ nets
def _integer_labels(t, rows, classes):
    """The labels as the kernels take them, or None for soft labels (2-D rows that are
    not one-hot), of which only the generic loop computes the book's loss."""
    t = np.asarray(t)
    if t.ndim == 2 and t.shape == (rows, classes):
        if not (np.all((t == 0) | (t == 1)) and np.all(t.sum(axis=1) == 1)):
            return None
    return labels(t, rows, classes, one_hot=True)


def numerical_gradient_net(net, x, t, h: float = H):
    """``{name: gradient}`` for every parameter of ``net`` by central differences.

    Exactly what the book's ``net.numerical_gradient(x, t)`` computes.  A
    ``MultiLayerNet`` of any depth with integer or one-hot labels goes through the
    active backend's ``numerical_gradient_mlp`` kernel; anything else runs the book's
    generic loop.
    """
    from .backend import kernels

    params = net.params
    x2 = np.asarray(x, dtype=params["W1"].dtype)
    x2 = x2.reshape(x2.shape[0], -1)
    sizes = getattr(net, "sizes", None)
    t_idx = None
    if sizes is not None and hasattr(net, "flat_params"):
        t_idx = _integer_labels(t, x2.shape[0], sizes[-1])
    if t_idx is None:

        def loss_W(W):
            return net.loss(x, t)

        return {key: numerical_gradient(loss_W, value, h) for key, value in params.items()}
    if x2.shape[1] != sizes[0]:
        raise ValueError(f"x has shape {np.shape(x)} but W1 has shape {params['W1'].shape}")
    theta = net.flat_params()
    grad = np.empty_like(theta)
    kernels().numerical_gradient_mlp(x2, t_idx, net.sizes, net.act_code, theta, h, grad)
    grads = net._views(grad)
    lam = getattr(net, "weight_decay_lambda", 0.0)
    if lam:  # the central difference of 0.5 * lam * w**2 is lam * w exactly
        for i in range(1, net.n_affine + 1):
            grads[f"W{i}"] += grads[f"W{i}"].dtype.type(lam) * params[f"W{i}"]
    return grads


class GradcheckError(AssertionError):
    """A gradient check failed; the message names the parameter, the index and both values."""


#: default (atol, rtol) by the dtype of the net: elementwise |a - n| <= atol + rtol * |n|
GRADCHECK_TOLERANCES = {np.dtype(np.float64): (1e-6, 1e-4), np.dtype(np.float32): (1e-4, 1e-2)}


class GradcheckReport:
    """Backprop against the numerical gradient, parameter by parameter.

    ``rows`` holds, for each parameter: ``name``, ``shape``, ``checked`` (how many
    elements), ``kinks`` (how many of them sit at a ReLU kink, see :func:`gradcheck`),
    ``max_abs``/``mean_abs`` (absolute error), ``max_rel``/``mean_rel`` (relative to
    ``max(|numerical|, atol)``), ``worst`` (index), ``analytic`` and ``numeric`` (the two
    values there), ``passed``.
    """

    def __init__(self, rows, atol, rtol, dtype, seconds):
        self.rows, self.atol, self.rtol, self.dtype, self.seconds = rows, atol, rtol, dtype, seconds

    @property
    def passed(self) -> bool:
        return all(row["passed"] for row in self.rows)

    def __getitem__(self, name):
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(name)

    def __str__(self):
        head = (f"gradcheck ({self.dtype}, atol {self.atol:g}, rtol {self.rtol:g}, "
                f"{self.seconds:.3f} s): {'PASSED' if self.passed else 'FAILED'}")
        lines = [head, f"{'param':<6} {'checked':>8} {'kinks':>6} {'max abs':>10} {'mean abs':>10} {'max rel':>10} "
                       f"{'worst at':>12} {'backprop':>12} {'numerical':>12}  result"]
        for r in self.rows:
            lines.append(
                f"{r['name']:<6} {r['checked']:>8d} {r['kinks']:>6d} {r['max_abs']:>10.3e} {r['mean_abs']:>10.3e} "
                f"{r['max_rel']:>10.3e} {str(r['worst']):>12} {r['analytic']:>12.5e} {r['numeric']:>12.5e}  "
                f"{'ok' if r['passed'] else 'FAIL'}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def _relu_kinks(net, x, eps):
    """For a ReLU net of any depth: which elements of each W{k} and b{k} before a ReLU move
    some sample's pre-activation z{k} across 0 within +-eps (a weight W{k}[i, j] moves
    z{k}[:, j] by eps * h{k-1}[:, i], a bias b{k}[j] by eps).  There the central
    difference straddles the kink of ReLU and legitimately differs from backprop's
    one-sided derivative (a dead unit makes the next layer's z exactly its bias: a kink
    for that bias).  What a perturbation does to the layers above is not followed."""
    p = net.params
    sizes = getattr(net, "sizes", ())
    if getattr(net, "activation", None) != "relu" or len(sizes) < 3:
        return {}
    h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    kinks = {}
    for k in range(1, len(sizes) - 1):
        z = h @ p[f"W{k}"].astype(np.float64) + p[f"b{k}"]
        a = np.abs(z) / eps  # (B, units)
        ah = np.abs(h)
        w = np.zeros(p[f"W{k}"].shape, dtype=bool)
        for i in range(h.shape[0]):
            near = np.flatnonzero(a[i] <= ah[i].max())
            if near.size:
                w[:, near] |= (ah[i][:, None] >= a[i][near][None, :]) & (ah[i][:, None] > 0)
        kinks[f"W{k}"], kinks[f"b{k}"] = w, (a <= 1.0).any(axis=0)
        h = np.maximum(z, 0)
    return kinks


def gradcheck(net, x, t, *, eps: float = H, atol=None, rtol=None, params=None, subset=None,
              seed=0, include_kinks: bool = False, raise_exception: bool = False) -> GradcheckReport:
    """Compare ``net.gradient(x, t)`` (backprop) with the numerical gradient.

    ``params`` limits the check to some parameter names; ``subset=k`` checks ``k``
    random elements of each parameter (for big nets: the numerical gradient is then
    taken element by element with the book's loop).  Tolerances default by dtype
    (:data:`GRADCHECK_TOLERANCES`).  With ``raise_exception=True`` a failure raises
    :class:`GradcheckError` naming the parameter, the index and both values.

    For a ReLU net, elements whose +-eps moves a hidden pre-activation across 0 are
    counted as ``kinks`` and, unless ``include_kinks=True``, left out of the
    pass/fail decision: the central difference there averages the two slopes of ReLU.
    """
    import time

    start = time.perf_counter()
    dtype = np.dtype(net.params["W1"].dtype)
    d_atol, d_rtol = GRADCHECK_TOLERANCES.get(dtype, GRADCHECK_TOLERANCES[np.dtype(np.float64)])
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    names = list(net.params) if params is None else list(params)
    unknown = [n for n in names if n not in net.params]
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; the net has {list(net.params)}")
    analytic = net.gradient(x, t)
    analytic = {k: np.array(v, copy=True) for k, v in analytic.items()}
    gen = np.random.default_rng(seed)
    kinks = {} if include_kinks else _relu_kinks(net, x, eps)
    rows = []
    if subset is None:
        numeric = numerical_gradient_net(net, x, t, eps)
    for name in names:
        a = analytic[name]
        if subset is None:
            n = numeric[name]
            flat_idx = np.arange(a.size)
        else:
            flat_idx = np.sort(gen.choice(a.size, size=min(int(subset), a.size), replace=False))
            n = np.full(a.shape, np.nan)
            p = net.params[name].reshape(-1)
            for i in flat_idx:
                tmp = p[i]
                try:
                    p[i] = tmp + eps
                    hi = net.loss(x, t)
                    p[i] = tmp - eps
                    lo = net.loss(x, t)
                finally:
                    p[i] = tmp
                n.reshape(-1)[i] = (hi - lo) / (2 * eps)
        av = a.reshape(-1)[flat_idx].astype(np.float64)
        nv = n.reshape(-1)[flat_idx].astype(np.float64)
        err = np.abs(av - nv)
        rel = err / np.maximum(np.abs(nv), atol)
        excess = err - (atol + rtol * np.abs(nv))
        at_kink = kinks[name].reshape(-1)[flat_idx] if name in kinks else np.zeros(flat_idx.size, bool)
        judged = np.where(at_kink, -np.inf, excess)
        worst_k = int(np.argmax(judged)) if not at_kink.all() else int(np.argmax(excess))
        worst = np.unravel_index(int(flat_idx[worst_k]), a.shape)
        row = {
            "name": name, "shape": a.shape, "checked": int(flat_idx.size), "kinks": int(at_kink.sum()),
            "max_abs": float(err.max()), "mean_abs": float(err.mean()),
            "max_rel": float(rel.max()), "mean_rel": float(rel.mean()),
            "worst": tuple(int(i) for i in worst), "analytic": float(av[worst_k]),
            "numeric": float(nv[worst_k]), "passed": bool(judged.max() <= 0),
        }
        rows.append(row)
        if raise_exception and not row["passed"]:
            raise GradcheckError(
                f"gradient check failed for {name}{list(row['worst'])}: backprop {row['analytic']:.9g}, "
                f"numerical {row['numeric']:.9g}, |difference| {err[worst_k]:.3g} > "
                f"atol {atol:g} + rtol {rtol:g} * |numerical|"
            )
    return GradcheckReport(rows, atol, rtol, dtype.name, time.perf_counter() - start)
