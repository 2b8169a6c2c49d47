"""Training: the book's mini-batch loop, with a compiled fast path.

:class:`Trainer` runs the chapter-5 experiment (``train_neuralnet.py``): draw
``batch_size`` random rows (with replacement, as ``np.random.choice`` does in the
book), compute the gradient, update, and after every epoch measure the accuracy on the
whole training and test sets.  What it adds: a seed that makes every run repeatable,
a fast path that runs many steps of any ``MultiLayerNet`` with any of the book's
optimisers in one compiled kernel call (the MLP engine, ``train_steps_mlp``),
callbacks, checkpoints, and a clean stop on Ctrl-C that keeps the weights and the
history so far.

Images may be given as floats or as uint8 pixels; pixels are normalised on the fly to
``x / 255`` in the net's dtype, exactly as ``load_mnist(normalize=True)`` does, which
keeps a quarter of the memory and of the memory traffic.
"""

from __future__ import annotations

import json
import math
import sys
import time
import zipfile
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from . import io as _io
from ._validate import describe_nonfinite, labels
from .backend import get_backend, kernels
from .gradient import numerical_gradient_net
from .kernels.contract import OPT_ITER, OPT_LR
from .nets import MultiLayerNet
from .optim import in_engine, make_optimizer

__all__ = ["Trainer", "History", "TrainingInterrupted", "SPARSE_MAX_DENSITY", "STEPS_PER_CALL"]

#: ``sparse='auto'`` runs the first layer over the non-zero inputs (CSR rows) when at most
#: this share of the training inputs is non-zero, by backend: up to where the engine's
#: sparse steps are faster than its dense ones (benchmarks/README.md, "sparse or
#: dense").  The reference's sparse kernels densify each batch (they are the oracle):
#: never there.
SPARSE_MAX_DENSITY = {"cython": 0.45, "numba": 0.25}

#: The fused path runs up to this many steps per kernel call (``train_steps_mlp``): no
#: Python between them, and Ctrl-C and the progress bar still answer within a few tens
#: of milliseconds.
STEPS_PER_CALL = 100


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Trainer.fit`; ``history`` and ``saved`` say what was kept."""

    def __init__(self, history, saved):
        super().__init__("training interrupted")
        self.history, self.saved = history, saved


@dataclass
class History:
    """What a run measured: the loss of every step and the accuracies of every epoch."""

    loss: list = field(default_factory=list)
    epoch_iter: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    config: dict = field(default_factory=dict)

    def snapshot(self) -> History:
        """A copy that the training's later steps do not change (the lists and the
        config copied, their values shared): what a checkpoint writes."""
        return replace(self, **{f.name: list(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), list)}, config=dict(self.config))

    def collapsed(self, classes: int) -> str | None:
        """Why this run learned nothing, or None: its last accuracy on the training data
        is no better than guessing (at most 1.5 / classes) and its loss never came down
        from where it started (the mean of the last tenth of the steps is no lower than
        that of the first ten).  A short run that is still learning is not collapsed."""
        if not self.train_acc or not self.loss or self.train_acc[-1] > 1.5 / classes:
            return None
        first = float(np.mean(self.loss[:10]))
        last = float(np.mean(self.loss[-max(len(self.loss) // 10, 1):]))
        if last < first:
            return None
        return (f"the run learned nothing: training accuracy {self.train_acc[-1]:.4f} is chance level for "
                f"{classes} classes and the loss went from {first:.4g} to {last:.4g} (the learning rate "
                f"{self.config.get('lr')} is likely too large)")

    def dumps(self, cache: dict | None = None) -> str:
        """metrics.json: one line per field (json's C encoder runs only without
        ``indent``, so each field is encoded compactly and the lines are joined)."""
        losses = self._losses_json(cache)
        lines = [f" {json.dumps(f.name)}: {losses if f.name == 'loss' else json.dumps(getattr(self, f.name))}"
                 for f in fields(self)]
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def _losses_json(self, cache: dict | None) -> str:
        """The losses as JSON.  ``cache``, a dict kept from one call to the next, holds
        the losses encoded last and their text: when they still begin the list (the same
        objects: a quick compare), only the losses after them are encoded.  A run of
        10,000 steps writes metrics.json after each of its 17 epochs, and encoding every
        loss each time takes several times as long as the new ones."""
        if cache is None:
            return json.dumps([float(v) for v in self.loss])
        done, text = cache.get("losses", []), cache.get("text", "")
        if self.loss[: len(done)] != done:
            done, text = [], ""
        new = json.dumps([float(v) for v in self.loss[len(done):]])[1:-1]
        text = ", ".join(part for part in (text, new) if part)
        cache.update(losses=list(self.loss), text=text)
        return f"[{text}]"


def _as_rows(x, name):
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must hold one sample per row, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise TypeError(f"{name} must be float or uint8 pixels, got {x.dtype}")
    return np.ascontiguousarray(x)


class _Progress:
    def __init__(self, total, stream, enabled):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, done, loss):
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and done < self.total:
            return
        self._last = now
        frac = done / self.total
        rate = done / max(now - self.start, 1e-9)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r[{bar:<30}] {done}/{self.total} it  {rate:,.0f} it/s  loss {loss:.4f}")
        self.stream.flush()

    def line(self, text, stream=None):
        """A line of its own (stdout unless told), clearing the bar first."""
        if self.enabled:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()
        out = sys.stdout if stream is None else stream
        out.write(text + "\n")
        out.flush()


class Trainer:
    """Mini-batch training of a :class:`~fastnet.nets.MultiLayerNet` (or ``TwoLayerNet``).

    Give ``iters`` (the book: 10000) or ``epochs``; one epoch is
    ``max(len(x_train) // batch_size, 1)`` iterations, as in the book.  ``optimizer`` is
    'sgd' (the book's), 'momentum', 'adagrad', 'adam' or an object with ``update(params, grads)``.
    ``seed`` fixes the batches: the same seed, net and backend give identical results.

    ``gradient='numerical'`` trains with the book's chapter-4 numerical gradient (fast
    on the compiled backends) instead of backprop.  ``fused`` chooses the MLP engine's
    training steps: ``'auto'`` (whenever the gradient is backprop), ``True`` (require
    it) or ``False`` (the book's loop of ``net.gradient`` and ``optimizer.update``).
    With one of the four optimisers of :mod:`fastnet.optim` the engine runs up to
    :data:`STEPS_PER_CALL` steps, optimiser and weight decay included, in one kernel
    call; any other optimiser object gets the engine's gradient of each batch.
    ``callbacks`` are called after every
    epoch as ``callback(trainer, record)``; one that returns ``False`` stops training.
    ``checkpoint_dir`` receives ``weights.npz`` and ``metrics.json`` after every epoch
    and on Ctrl-C.  An epoch's files are written by a thread of their own while the
    training goes on (each file replaced atomically); all are on disk when ``fit()``
    returns or raises, and :meth:`save_checkpoint` writes the current state at once.

    ``sparse`` chooses how the engine's steps and the evaluation read the inputs: as
    rows of non-zeros (CSR, built once per data set) so that the first layer touches
    only non-zero pixels, or dense.  ``'auto'`` uses it when at most the backend's
    :data:`SPARSE_MAX_DENSITY` of the inputs are non-zero (MNIST: 19%; Cython up to 45%,
    Numba up to 25%, as measured); the reference backend's sparse kernels densify each
    batch (they are the oracle), so ``'auto'`` keeps it dense there.  Both give the same
    parameters up to rounding order.
    """

    def __init__(
        self,
        net: MultiLayerNet,
        x_train,
        t_train,
        x_test=None,
        t_test=None,
        *,
        iters: int | None = None,
        epochs: int | None = None,
        batch_size: int = 100,
        optimizer="sgd",
        lr: float | None = 0.1,
        seed=0,
        evaluate: bool = True,
        fused="auto",
        sparse="auto",
        gradient: str = "backprop",
        callbacks=(),
        checkpoint_dir=None,
        progress: bool = False,
        verbose: bool = False,
        stream=None,
    ):
        if not isinstance(net, MultiLayerNet):
            raise TypeError(f"Trainer trains a MultiLayerNet or TwoLayerNet, got {type(net).__name__}")
        if (iters is None) == (epochs is None):
            raise ValueError("give exactly one of iters or epochs")
        self.net = net
        self.x_train = _as_rows(x_train, "x_train")
        n, d = self.x_train.shape
        classes = net.sizes[-1]
        if d != net.sizes[0]:
            raise ValueError(f"x_train has {d} features per row but the net takes {net.sizes[0]}")
        if n == 0:
            raise ValueError("x_train is empty")
        self.t_train = labels(t_train, n, classes, "t_train", one_hot=True)
        self.x_test = self.t_test = None
        if x_test is not None:
            self.x_test = _as_rows(x_test, "x_test")
            if self.x_test.shape[1] != d:
                raise ValueError(f"x_test has {self.x_test.shape[1]} features per row, x_train {d}")
            self.t_test = labels(t_test, self.x_test.shape[0], classes, "t_test", one_hot=True)
        for name, x in (("x_train", self.x_train), ("x_test", self.x_test)):
            if x is not None and x.dtype.kind == "f":
                problem = describe_nonfinite(x, name)
                if problem:
                    raise ValueError(problem)
        self.batch_size = int(batch_size)
        if not 1 <= self.batch_size <= n:
            raise ValueError(f"batch_size must be from 1 to the {n} training rows, got {batch_size}")
        self.iter_per_epoch = max(n // self.batch_size, 1)
        self.iters = int(iters) if iters is not None else int(epochs) * self.iter_per_epoch
        if self.iters < 1:
            raise ValueError("iters and epochs must be at least 1")
        self.optimizer = make_optimizer(optimizer, lr)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.evaluate = evaluate
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if self.checkpoint_dir is not None:
            repair_checkpoint(self.checkpoint_dir)
        self._checkpoints = []  # the epochs' checkpoints submitted to the writer and not yet checked
        self._newest = 0  # the number of the newest of them
        self._metrics_cache = {}  # what History.dumps encoded last (used by one thread at a time)
        self.progress = progress
        self.verbose = verbose
        self.stream = sys.stderr if stream is None else stream
        self.history = History()
        if gradient not in ("backprop", "numerical"):
            raise ValueError(f"gradient must be 'backprop' or 'numerical', got {gradient!r}")
        self.gradient = gradient
        if fused not in ("auto", True, False):
            raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
        if fused is True and gradient != "backprop":
            raise ValueError("the fused training steps compute the gradient by backprop, not numerically")
        self.fused = gradient == "backprop" if fused == "auto" else fused
        for name in ("x_train", "x_test"):  # once: the kernels take one float dtype
            x = getattr(self, name)
            if x is not None and x.dtype.kind == "f" and x.dtype != net.dtype:
                setattr(self, name, x.astype(net.dtype))
        if sparse not in ("auto", True, False):
            raise ValueError(f"sparse must be 'auto', True or False, got {sparse!r}")
        if sparse is True and not (self.fused and in_engine(self.optimizer)):
            raise ValueError("sparse=True needs the fused steps (backprop) with one of fastnet.optim's optimisers")
        self.sparse_option = sparse
        self._sparse = None  # decided when fit() starts (the backend may change until then)
        self._csr = {}

    # ------------------------------------------------------------------ inputs as CSR
    def density(self) -> float:
        """Share of non-zero values in the training inputs (from up to 2,000 rows)."""
        sample = self.x_train[: min(2000, self.x_train.shape[0])]
        return float(np.count_nonzero(sample)) / max(sample.size, 1)

    def use_sparse(self) -> bool:
        """Whether the step and the evaluation read the inputs as CSR rows (see ``sparse``)."""
        if not (self.fused and in_engine(self.optimizer)) or self.sparse_option is False:
            return False
        if self.sparse_option is True:
            return True
        limit = SPARSE_MAX_DENSITY.get(get_backend())
        return limit is not None and self.density() <= limit

    def _rows_csr(self, x):
        """The CSR rows of ``x``; kept for the training and test sets (built once each;
        the ``sparse_rows`` kernel is timed in benchmarks/bench_kernels.py).  Float rows
        are stored in the net's dtype: a kernel never mixes dtypes."""

        def build(rows):
            if rows.dtype != np.uint8 and rows.dtype != self.net.dtype:
                rows = rows.astype(self.net.dtype)
            return kernels().sparse_rows(rows)

        for name in ("x_train", "x_test"):
            if x is getattr(self, name):
                if name not in self._csr:
                    self._csr[name] = build(x)
                return self._csr[name]
        return build(x)

    # ------------------------------------------------------------------ steps
    def _floats(self, rows, out=None):
        """uint8 pixels as ``rows / 255`` in the net's dtype (what load_mnist(normalize=True)
        gives, in one pass; into ``out`` when given); float rows unchanged."""
        if rows.dtype != np.uint8:
            return rows
        return np.divide(rows, self.net.dtype.type(255), out=out, dtype=self.net.dtype)

    def _step_layers(self, idx):
        net = self.net
        xb = self._floats(self.x_train[idx])
        if self.gradient == "numerical":
            tb = self.t_train[idx]
            loss = net.loss(xb, tb)
            grads = numerical_gradient_net(net, xb, tb)
            self.optimizer.update(net.params, grads)
            return loss
        grads = net.gradient(xb, self.t_train[idx])
        loss = net.lastLayer.loss + (net.weight_decay() if net.weight_decay_lambda else 0.0)
        self.optimizer.update(net.params, grads)
        return loss

    def _prepare_fused(self):
        """The engine's arguments, once per fit() (the backend is fixed while it runs):
        the inputs (CSR rows or dense), the optimiser's record and its state, which the
        optimiser object then holds as views (so the engine and ``update`` share it)."""
        net = self.net
        self._rows = self._rows_csr(self.x_train) if self._sparse else (self.x_train,)
        self._losses = np.empty(STEPS_PER_CALL)
        if in_engine(self.optimizer):
            self._opt = self.optimizer.record(net.weight_decay_lambda)
            self._state = np.zeros((2, net.flat_params().size), net.dtype)
            self.optimizer.bind_state(self._state, net._views)

    def _step_fused(self, idx):
        """One step for an optimiser of the user's: the engine's gradient, then its update."""
        net = self.net
        theta = net.flat_params()
        grad = np.empty_like(theta)
        loss = kernels().mlp_gradient(self.x_train, self.t_train, idx, net.sizes, net.act_code, theta,
                                      net.weight_decay_lambda, grad)
        self.optimizer.update(net.params, net._views(grad))
        return loss

    def _steps_fused(self, idx):
        """len(idx) engine steps in one kernel call; returns their losses (fewer when one
        is not finite: the kernel stops there)."""
        net, k = self.net, kernels()
        losses = self._losses[: len(idx)]
        self._opt[OPT_LR] = self.optimizer.lr  # a callback may have changed it
        steps = k.train_steps_mlp_sparse if self._sparse else k.train_steps_mlp
        ran = steps(*self._rows, self.t_train, idx, net.sizes, net.act_code, net.flat_params(), self._opt,
                    self._state, losses)
        if hasattr(self.optimizer, "iter"):
            self.optimizer.iter = int(self._opt[OPT_ITER])
        return losses[:ran]

    def accuracy(self, x, t) -> float:
        """Accuracy of the net on all rows of ``x`` (floats of the net's dtype or uint8
        pixels, normalised on the fly as ``load_mnist(normalize=True)`` would): the labels
        of every row from one kernel call, ``sparse_predict_mlp`` over the CSR rows on
        the sparse path, else ``predict_mlp``."""
        net, k = self.net, kernels()
        if x is not self.x_train and x is not self.x_test:  # the kernels take 2-D rows of one dtype
            x = _as_rows(x, "x")
            if x.dtype.kind == "f" and x.dtype != net.dtype:
                x = x.astype(net.dtype)
            t = labels(t, x.shape[0], net.sizes[-1], one_hot=True)
        predicted = np.empty(x.shape[0], np.int64)
        if self._sparse if self._sparse is not None else self.use_sparse():
            k.sparse_predict_mlp(*self._rows_csr(x), 0, net.sizes, net.act_code, net.flat_params(), predicted)
        else:
            k.predict_mlp(x, net.sizes, net.act_code, net.flat_params(), predicted)
        return int(np.count_nonzero(predicted == t)) / x.shape[0]

    # ------------------------------------------------------------------ the loop
    def fit(self) -> History:
        """Train; returns the :class:`History`.  Ctrl-C raises :class:`TrainingInterrupted`
        after saving the weights and history so far (to ``checkpoint_dir``, if given)."""
        h = self.history
        h.config = {
            "sizes": self.net.sizes, "activation": self.net.activation,
            "dtype": self.net.dtype.name, "backend": get_backend(), "iters": self.iters,
            "batch_size": self.batch_size, "optimizer": getattr(self.optimizer, "name", type(self.optimizer).__name__),
            "lr": getattr(self.optimizer, "lr", None), "seed": self.seed, "fused": self.fused,
            "iter_per_epoch": self.iter_per_epoch, "gradient": self.gradient, "train_size": int(self.x_train.shape[0]),
            "weight_decay": self.net.weight_decay_lambda,
        }
        self._sparse = self.use_sparse()
        h.config["sparse"] = self._sparse
        if self.fused:
            self._prepare_fused()
        # the engine runs many steps per kernel call (up to the end of the epoch,
        # STEPS_PER_CALL at most); the batches are the same as one at a time
        many = self.fused and in_engine(self.optimizer)
        step = self._step_fused if self.fused else self._step_layers
        n, B, per_epoch = self.x_train.shape[0], self.batch_size, self.iter_per_epoch
        bar = _Progress(self.iters, self.stream, self.progress)
        # the epochs' checkpoints are written on a thread of their own: a rename over the
        # previous files can hold it for a quarter of a second on a busy disk, and the
        # training goes on meanwhile
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fastnet-checkpoints")
        start = time.perf_counter()
        epoch_start = start
        done = h.iterations
        try:
            while done < self.iters:
                if many:
                    k = min(self.iters - done, per_epoch - done % per_epoch, STEPS_PER_CALL)
                    losses = self._steps_fused(self.rng.integers(0, n, (k, B)))
                    loss = float(losses[-1])
                    good = len(losses) if math.isfinite(loss) else len(losses) - 1
                    h.loss.extend(losses[:good].tolist())  # as one step at a time: finite losses only
                    done += good
                    if good < len(losses):
                        h.iterations = done
                        self._diverged(loss, done)
                else:
                    try:
                        loss = step(self.rng.integers(0, n, B))
                    except FloatingPointError as exc:  # the layers found the loss not finite
                        raise FloatingPointError(f"training diverged at iteration {done + 1}: {exc}") from None
                    if not math.isfinite(loss):
                        self._diverged(loss, done)
                    h.loss.append(loss)
                    done += 1
                h.iterations = done
                bar.update(done, loss)
                if done % per_epoch == 0 or done == self.iters:
                    now = time.perf_counter()
                    h.epoch_seconds.append(now - epoch_start)
                    if not self._end_epoch(bar):
                        break
                    epoch_start = time.perf_counter()
        except KeyboardInterrupt:
            h.interrupted = True
            h.seconds = time.perf_counter() - start
            saved = self.save_checkpoint()
            where = f"; weights and history saved in {saved}" if saved else ""
            bar.line(f"interrupted after {done} of {self.iters} iterations{where}", self.stream)
            raise TrainingInterrupted(h, saved) from None
        except BaseException:
            self._checkpoints_written(errors=False)  # the checkpoints taken so far are on disk; this error first
            raise
        finally:
            self._writer.shutdown()
        h.seconds = time.perf_counter() - start
        self._checkpoints_written()  # fit() returns with the last epoch's checkpoint on disk
        return h

    def _diverged(self, loss, done):
        problem = None
        for key, value in self.net.params.items():
            problem = describe_nonfinite(value, f"parameter {key}")
            if problem:
                break
        raise FloatingPointError(
            f"the loss became {loss} at iteration {done + 1}: "
            f"{problem or 'non-finite values'} (training diverged: try a smaller learning rate)"
        )

    def _end_epoch(self, bar) -> bool:
        h = self.history
        epoch = len(h.epoch_iter) + 1
        h.epoch_iter.append(h.iterations)
        record = {"epoch": epoch, "iteration": h.iterations, "loss": float(h.loss[-1])}
        if self.evaluate:
            h.train_acc.append(self.accuracy(self.x_train, self.t_train))
            record["train_acc"] = h.train_acc[-1]
            text = (f"epoch {epoch:3d}  iter {h.iterations:6d}  loss {record['loss']:.4f}  "
                    f"train acc {h.train_acc[-1]:.4f}")
            if self.x_test is not None:
                h.test_acc.append(self.accuracy(self.x_test, self.t_test))
                record["test_acc"] = h.test_acc[-1]
                text += f"  test acc {h.test_acc[-1]:.4f}"
            if self.verbose:
                bar.line(text)
        self._checkpoint_epoch()
        keep_going = True
        for callback in self.callbacks:
            if callback(self, record) is False:
                keep_going = False
        return keep_going

    def save_checkpoint(self):
        """Write ``weights.npz`` and ``metrics.json`` to ``checkpoint_dir`` now (after the
        epochs' checkpoints still being written); returns the folder."""
        if self.checkpoint_dir is None:
            return None
        self._checkpoints_written()
        metrics = self.history.dumps(self._metrics_cache).encode()
        return _write_checkpoint(self.checkpoint_dir, _net_arrays(self.net), metrics)

    def _checkpoint_epoch(self):
        """The checkpoint of an epoch's end: the weights and the history copied now,
        written by the writer's thread.  The writer takes them in order and skips one
        that a newer checkpoint follows, so a slow disk writes the newest next."""
        if self.checkpoint_dir is None:
            return
        self._checkpoints_written(wait=False)  # an earlier epoch's error, if any, stops the training
        self._newest += 1
        self._checkpoints.append(self._writer.submit(self._write_epoch, self._newest, self.checkpoint_dir,
                                                     _net_arrays(self.net, copy=True), self.history.snapshot()))

    def _write_epoch(self, number, folder, arrays, history):
        if number == self._newest:
            _write_checkpoint(folder, arrays, history.dumps(self._metrics_cache).encode())

    def _checkpoints_written(self, wait: bool = True, errors: bool = True) -> None:
        """Raise the error of an epoch's checkpoint that could not be written (disk full,
        folder gone), or forget it with ``errors=False``; with ``wait``, first wait until
        every submitted checkpoint is written."""
        if wait:
            futures.wait(self._checkpoints)
        done = [f for f in self._checkpoints if f.done()]
        self._checkpoints = [f for f in self._checkpoints if not f.done()]
        for future in done:
            if errors and future.exception() is not None:
                raise future.exception()


def _net_arrays(net: MultiLayerNet, copy: bool = False) -> dict:
    """What ``save_net`` writes: the parameters (copies if ``copy``) and how to rebuild the net."""
    meta = {"sizes": np.array(net.sizes), "activation": np.array(net.activation)}
    params = {k: np.array(v, copy=True) if copy else v for k, v in net.params.items()}
    return {**params, **{f"__{k}__": v for k, v in meta.items()}}


def save_net(path, net: MultiLayerNet):
    """Save a net's parameters with what is needed to rebuild it (``load_net``)."""
    return _io.save_params(path, _net_arrays(net))


def _write_checkpoint(folder: Path, arrays: dict, metrics: bytes) -> Path:
    """``weights.npz`` carries the metrics of its own epoch (``__metrics__``, the bytes
    of metrics.json), so the checkpoint is one unit that a rename replaces whole;
    ``metrics.json`` is a copy written after it.  A process killed between the two
    renames leaves metrics.json an epoch behind: :func:`repair_checkpoint` (run by the
    next Trainer given that folder) writes it again from weights.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    _io.save_params(folder / "weights.npz", {**arrays, "__metrics__": np.frombuffer(metrics, np.uint8)})
    _io.atomic_write(folder / "metrics.json", lambda fh: fh.write(metrics))
    return folder


def repair_checkpoint(folder) -> None:
    """Make ``folder``'s checkpoint whole again after a process died writing it: the
    temporary files of dead writers are removed, and metrics.json is rewritten from
    the metrics that weights.npz carries when the two differ."""
    folder = Path(folder)
    _io.remove_stale_parts(folder)
    try:
        with np.load(folder / "weights.npz", allow_pickle=False) as data:
            if "__metrics__" not in data.files:
                return
            metrics = data["__metrics__"].tobytes()
        current = (folder / "metrics.json").read_bytes() if (folder / "metrics.json").exists() else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return  # no checkpoint here, or not one of ours: nothing to repair
    if current != metrics:
        _io.atomic_write(folder / "metrics.json", lambda fh: fh.write(metrics))


def load_net(path) -> MultiLayerNet:
    """Rebuild the net saved by :func:`save_net` (or any ``.npz`` of ``W1, b1, …``).

    The layer sizes are read off the weights themselves, which must chain (``W{i}``
    2-D, ``b{i}`` of its width, ``W{i+1}`` as many rows); a ``__sizes__`` entry must
    agree with them.  Anything else is a ValueError naming the file and the entry."""
    data = _io.load_params(path)
    params = {k: v for k, v in data.items() if not k.startswith("__")}
    n = 0
    while f"W{n + 1}" in params:
        n += 1
    if n == 0:
        raise ValueError(f"{path} holds no weights W1, b1, … (found {', '.join(sorted(data)) or 'nothing'})")
    extra = sorted(set(params) - {f"{p}{i}" for p in "Wb" for i in range(1, n + 1)})
    if extra:
        raise ValueError(f"{path}: unexpected entries {', '.join(extra)} beside W1..W{n}, b1..b{n}")
    sizes = []
    for i in range(1, n + 1):
        W, b = params[f"W{i}"], params.get(f"b{i}")
        if W.ndim != 2 or W.dtype.kind != "f":
            raise ValueError(f"{path}: W{i} must be a 2-D float array, got shape {W.shape} of {W.dtype}")
        if sizes and W.shape[0] != sizes[-1]:
            raise ValueError(f"{path}: W{i} has shape {W.shape} but W{i - 1} has {sizes[-1]} columns")
        if b is None or b.shape != (W.shape[1],):
            raise ValueError(f"{path}: b{i} must have shape ({W.shape[1]},) to go with W{i} {W.shape}"
                             f", got {'nothing' if b is None else b.shape}")
        sizes += [W.shape[0], W.shape[1]] if i == 1 else [W.shape[1]]
    if "__sizes__" in data and [int(s) for s in np.ravel(data["__sizes__"])] != sizes:
        raise ValueError(f"{path}: __sizes__ {data['__sizes__'].tolist()} disagrees with the weights' {sizes}")
    activation = str(data["__activation__"]) if "__activation__" in data else "relu"
    net = MultiLayerNet(sizes[0], sizes[1:-1], sizes[-1], activation=activation,
                        dtype=params["W1"].dtype, seed=0)
    net.set_params(params)
    return net
