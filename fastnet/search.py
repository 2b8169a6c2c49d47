"""Hyperparameter search (the book's chapter 6) over Dask: random or grid, any machine count.

A search draws trial configurations from a :class:`Space` (log-uniform and uniform
ranges, choices), trains each with a :class:`~fastnet.train.Trainer` on a training
split and measures it on a validation split taken from the training set (never the test
set), and appends each finished trial at once to ``results.jsonl``.  The trials run on
Dask distributed: a ``LocalCluster`` of single-threaded worker processes here, or an
existing cluster (``dask scheduler`` / ``dask worker`` on other machines) given by its
address.  The data goes to every worker once; a worker that dies mid-trial has its
trial run again elsewhere; ``resume`` skips the trials already in the file.

Trial ``i`` of a search is drawn from ``numpy.random.default_rng([seed, i])``: the same
search (space, seed) gives the same trials however they are scheduled, which is what
lets a resumed search skip exactly the trials it has.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Range", "Choice", "Space", "parse_range", "parse_hidden", "search", "run_trial", "load_results",
           "SearchError"]

RESULTS = "results.jsonl"
#: what a trial is given when the space does not say (the book's chapter-6 search)
DEFAULTS = {"lr": 0.01, "weight_decay": 0.0, "hidden": (100, 100, 100, 100, 100, 100), "optimizer": "sgd",
            "batch_size": 100, "activation": "relu", "seed": 0}
KINDS = {"lr": float, "weight_decay": float, "batch_size": int, "seed": int, "optimizer": str,
         "activation": str, "hidden": tuple}


class SearchError(ValueError):
    """A search that cannot run as asked: a bad range, option or results file."""


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high``: log-uniform when ``log``, else uniform; ``points``
    evenly spaced values (on the log scale when ``log``) for a grid search."""

    low: float
    high: float
    log: bool = False
    points: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= self.high):
            raise SearchError(f"a range needs finite LOW <= HIGH, got {self.low}:{self.high}")
        if self.log and self.low <= 0:
            raise SearchError(f"a log range needs LOW > 0, got {self.low}")
        if self.points is not None and self.points < 1:
            raise SearchError(f"a grid range needs at least 1 point, got {self.points}")

    def draw(self, rng) -> float:
        if self.log:
            return float(10 ** rng.uniform(math.log10(self.low), math.log10(self.high)))
        return float(rng.uniform(self.low, self.high))

    def grid(self) -> list:
        if self.points is None:
            raise SearchError(f"a grid search needs the number of points of each range: LOW:HIGH[:log]:N, "
                              f"got {self.low}:{self.high}{':log' if self.log else ''}")
        if self.log:
            return [float(v) for v in np.logspace(math.log10(self.low), math.log10(self.high), self.points)]
        return [float(v) for v in np.linspace(self.low, self.high, self.points)]


@dataclass(frozen=True)
class Choice:
    """One of ``values``, each equally likely (a grid takes them all)."""

    values: tuple

    def __post_init__(self):
        if not self.values:
            raise SearchError("a choice needs at least one value")

    def draw(self, rng):
        return self.values[int(rng.integers(len(self.values)))]

    def grid(self) -> list:
        return list(self.values)


def parse_range(text: str, kind=float):
    """``LOW:HIGH[:log][:N]`` as a :class:`Range`; ``a,b,c`` (or one value) as a :class:`Choice`."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = text.split(":")
            log = "log" in parts[2:]
            rest = [p for p in parts[2:] if p != "log"]
            if len(parts) < 2 or len(rest) > 1:
                raise ValueError
            points = int(rest[0]) if rest else None
            low, high = kind(parts[0]), kind(parts[1])
            if kind is int and log:
                raise SearchError(f"{text!r}: integer options take LOW:HIGH or a,b,c, not log ranges")
            return Range(float(low), float(high), log, points) if kind is float else \
                Choice(tuple(range(int(low), int(high) + 1)))
        return Choice(tuple(kind(v) for v in text.split(",")))
    except SearchError:
        raise
    except ValueError:
        raise SearchError(f"{text!r} is neither a range LOW:HIGH[:log][:N] nor a choice a,b,c "
                          f"of {kind.__name__} values") from None


def parse_hidden(text: str) -> Choice:
    """Hidden layer sizes: ``100,100,100``, or choices between such lists separated by ``/``
    (``100,100/50,50,50``)."""
    try:
        options = tuple(tuple(int(s) for s in part.split(",")) for part in str(text).split("/"))
    except ValueError:
        raise SearchError(f"hidden sizes look like 100,100 or 100,100/50,50,50, got {text!r}") from None
    if any(not sizes or min(sizes) < 1 for sizes in options):
        raise SearchError(f"hidden sizes must be positive, got {text!r}")
    return Choice(options)


class Space:
    """What a search varies: name -> :class:`Range` or :class:`Choice` (or a fixed value)."""

    def __init__(self, **dims):
        unknown = sorted(set(dims) - set(KINDS))
        if unknown:
            raise SearchError(f"unknown search options {', '.join(unknown)}; known: {', '.join(KINDS)}")
        self.dims = {k: v if isinstance(v, (Range, Choice)) else Choice((v,)) for k, v in dims.items()}

    def trial(self, seed: int, index: int) -> dict:
        """Trial ``index`` of a random search with ``seed`` (the same every time)."""
        rng = np.random.default_rng([seed, index])
        config = dict(DEFAULTS)
        for name in KINDS:  # a fixed order: each trial's draws do not depend on dict order
            if name in self.dims:
                config[name] = _as_kind(name, self.dims[name].draw(rng))
        return config

    def grid(self) -> list[dict]:
        """Every combination of the dimensions' grid values, in a fixed order."""
        names = [n for n in KINDS if n in self.dims]
        combos = itertools.product(*(self.dims[n].grid() for n in names))
        return [{**DEFAULTS, **{n: _as_kind(n, v) for n, v in zip(names, combo)}} for combo in combos]


def _as_kind(name, value):
    return tuple(int(v) for v in value) if name == "hidden" else KINDS[name](value)


# ------------------------------------------------------------------ one trial
_MALLOC_SET = False


def _roomy_malloc() -> None:
    """Give glibc's malloc back its usual thresholds in a Dask worker.

    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's
    thresholds: every array over 128 KiB is then mapped and unmapped anew, and the
    layer-by-layer training step makes a few such temporaries per layer, each then a
    fresh mapping and a page fault per page.  The mmap threshold goes
    to 32 MiB (glibc's own ceiling for its dynamic threshold) and the trim threshold to
    twice that, once per process; elsewhere than glibc, nothing."""
    global _MALLOC_SET
    if _MALLOC_SET:
        return
    _MALLOC_SET = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
    except (OSError, AttributeError):
        pass


def split(x, t, train_size=None, validation=0.2, seed=0):
    """The book's split: shuffle the training set with ``seed``, keep ``train_size`` rows
    (all when None), and hold out the first ``validation`` fraction of them."""
    n = len(x)
    if train_size is not None and not 2 <= train_size <= n:
        raise SearchError(f"--train-size must be from 2 to the {n} training images, got {train_size}")
    if not 0 < validation < 1:
        raise SearchError(f"the validation fraction must be between 0 and 1, got {validation}")
    order = np.random.default_rng(seed).permutation(n)[: train_size or n]
    cut = max(int(len(order) * validation), 1)
    val, train = np.sort(order[:cut]), np.sort(order[cut:])
    return {"x_train": x[train], "t_train": t[train], "x_val": x[val], "t_val": t[val]}


def run_trial(trial: dict, data: dict, epochs: int, backend: str = "auto", dtype="float32") -> dict:
    """Train one configuration; returns its record for results.jsonl.  A run that
    diverges is a record too (status ``diverged``), not an error."""
    import fastnet
    from fastnet.nets import MultiLayerNet
    from fastnet.train import Trainer

    config = trial["config"]
    _roomy_malloc()
    started = time.perf_counter()
    fastnet.set_backend(backend)
    fastnet.set_num_threads(1)  # one trial per core: the workers are single-threaded
    activation = config["activation"]
    net = MultiLayerNet(data["x_train"].shape[1], list(config["hidden"]), int(data["classes"]),
                        activation=activation, weight_init_std="he" if activation == "relu" else "xavier",
                        weight_decay_lambda=config["weight_decay"], dtype=dtype, seed=config["seed"])
    trainer = Trainer(net, data["x_train"], data["t_train"], data["x_val"], data["t_val"], epochs=epochs,
                      batch_size=min(config["batch_size"], len(data["x_train"])), optimizer=config["optimizer"],
                      lr=config["lr"], seed=config["seed"], progress=False)
    status, message = "ok", ""
    try:
        history = trainer.fit()
    except FloatingPointError as exc:
        history, status, message = trainer.history, "diverged", str(exc)
    except MemoryError as exc:  # a net too big for the worker: the others go on
        history, status, message = trainer.history, "failed", f"not enough memory ({exc})"
    losses = [v for v in history.loss[-max(len(history.loss) // 10, 1):] if math.isfinite(v)]
    return {
        "trial": trial["trial"], "config": {**config, "hidden": list(config["hidden"])}, "status": status,
        "message": message, "train_acc": list(history.train_acc), "val_acc": list(history.test_acc),
        "final_loss": float(np.mean(losses)) if losses else None, "iterations": history.iterations,
        "seconds": time.perf_counter() - started, "worker": f"{socket.gethostname()}:{os.getpid()}",
    }


# ------------------------------------------------------------------ results
def load_results(path) -> list[dict]:
    """The records of ``results.jsonl``, one per trial (the last line of a trial wins; a
    line cut short by a crash while it was written is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["trial"])] = record
        except (ValueError, KeyError, TypeError):
            if number < len(lines):
                raise SearchError(f"{path}: line {number} is not a trial record") from None
    return [records[k] for k in sorted(records)]


def best(records, k=None) -> list[dict]:
    """Records ranked by their last validation accuracy (diverged runs last)."""
    def score(r):
        return r["val_acc"][-1] if r["val_acc"] and r["status"] == "ok" else -1.0
    return sorted(records, key=lambda r: (-score(r), r["trial"]))[:k]


def table(records, k=10) -> str:
    """The top ``k`` trials as a text table."""
    head = f"{'rank':>4} {'trial':>5} {'val acc':>7} {'train acc':>9} {'lr':>9} {'decay':>9} {'optimizer':>9} " \
           f"{'batch':>5} {'act':>7}  hidden"
    rows = [head]
    for rank, r in enumerate(best(records, k), 1):
        c = r["config"]
        val = f"{r['val_acc'][-1]:.4f}" if r["val_acc"] else "-"
        train = f"{r['train_acc'][-1]:.4f}" if r["train_acc"] else "-"
        note = "" if r["status"] == "ok" else f"  ({r['status']})"
        rows.append(f"{rank:>4} {r['trial']:>5} {val:>7} {train:>9} {c['lr']:>9.2e} {c['weight_decay']:>9.2e} "
                    f"{c['optimizer']:>9} {c['batch_size']:>5} {c['activation']:>7}  "
                    f"{','.join(map(str, c['hidden']))}{note}")
    return "\n".join(rows)


def _append(fh, record) -> None:
    fh.write(json.dumps(record) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


# ------------------------------------------------------------------ the search
def local_cluster(workers=None):
    """A LocalCluster of ``workers`` (default: one per core) single-threaded worker
    processes, without Dask's statistical profiler (it samples the trial's thread every
    10 ms, taking the GIL from it)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=workers or len(os.sched_getaffinity(0)), threads_per_worker=1,
                            processes=True, dashboard_address=None)


def search(x, t, space: Space, *, trials=100, grid=False, epochs=50, train_size=None, validation=0.2,
           seed=0, out="search-run", resume=False, scheduler=None, workers=None, backend="auto",
           dtype="float32", retries=2, on_result=None) -> list[dict]:
    """Run a search; returns every record of ``out/results.jsonl`` (sorted by trial).

    ``scheduler``: the address of a running Dask scheduler (``tcp://host:port``); None
    starts a ``LocalCluster`` of ``workers`` single-threaded processes (default: one per
    core).  ``resume`` keeps the trials already in the file and runs the rest; without
    it, a folder that already holds results is refused.  ``on_result(record)`` is called
    as each trial finishes.  Ctrl-C stops the cluster and keeps the file.  As with any
    use of worker processes, a script that calls this runs it under
    ``if __name__ == "__main__":`` (the workers import the script's main module).
    """
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise SearchError('fastnet search runs on Dask: pip install "fastnet[search]"') from None
    out = Path(out)
    results_path = out / RESULTS
    if out.exists() and not out.is_dir():
        raise SearchError(f"--out {out} is a file; give a folder")
    done = {r["trial"] for r in load_results(results_path)}
    if done and not resume:
        raise SearchError(f"{results_path} already holds {len(done)} trials: --resume to go on, or another --out")
    configs = space.grid() if grid else [space.trial(seed, i) for i in range(trials)]
    todo = [{"trial": i, "config": c} for i, c in enumerate(configs) if i not in done]
    data = split(x, t, train_size, validation, seed)
    data["classes"] = int(t.max()) + 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps({
        "trials": len(configs), "grid": grid, "epochs": epochs, "train_size": train_size, "validation": validation,
        "seed": seed, "backend": backend, "dtype": dtype,
        "space": {k: repr(v) for k, v in space.dims.items()}}, indent=1) + "\n")
    if not todo:
        return load_results(results_path)
    cluster = None
    if scheduler is None:
        cluster = local_cluster(workers)
    client = None
    try:
        client = Client(cluster if cluster is not None else scheduler)  # (distributed.comm.timeouts.connect)
        [shared] = client.scatter([data], broadcast=True)  # once per worker, not once per trial
        futures = [client.submit(run_trial, job, shared, epochs, backend, dtype, key=f"fastnet-trial-{job['trial']}",
                                 retries=retries, pure=False) for job in todo]
        with open(results_path, "a") as fh:
            for future in as_completed(futures):
                record = future.result()
                _append(fh, record)
                if on_result is not None:
                    on_result(record)
    except OSError as exc:
        raise SearchError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return load_results(results_path)


# ------------------------------------------------------------------ figures
def plot_search(records, path, k=20) -> Path:
    """The book's figure: the best ``k`` trials' validation (solid) and training (dashed)
    accuracy per epoch, one small plot each, ranked."""
    from .plots import _matplotlib

    FigureCanvasAgg, Figure, _ = _matplotlib()
    ranked = best(records, k)
    cols = 5
    rows = max(math.ceil(len(ranked) / cols), 1)
    fig = Figure(figsize=(2.6 * cols, 2.0 * rows + 0.4))
    FigureCanvasAgg(fig)
    for i, r in enumerate(ranked):
        ax = fig.add_subplot(rows, cols, i + 1)
        epochs = range(1, len(r["val_acc"]) + 1)
        ax.plot(epochs, r["val_acc"], linewidth=1.2)
        ax.plot(epochs, r["train_acc"], linestyle="--", linewidth=1.0)
        ax.set_ylim(0, 1.0)
        ax.set_title(f"best-{i + 1} (val {r['val_acc'][-1]:.2f})" if r["val_acc"] else f"best-{i + 1}",
                     fontsize=8, y=1.0)
        ax.tick_params(labelsize=6)
        if i % cols:
            ax.set_yticks([])
    fig.suptitle("validation (solid) and training (dashed) accuracy of the best trials", fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.06, top=0.88, hspace=0.45, wspace=0.08)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path


def plot_scatter(records, path) -> Path:
    """Validation accuracy of every trial over learning rate x weight decay (log axes)."""
    from .plots import _matplotlib

    FigureCanvasAgg, Figure, _ = _matplotlib()
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ok = [r for r in records if r["val_acc"] and r["status"] == "ok"]
    lr = [r["config"]["lr"] for r in ok]
    decay = [max(r["config"]["weight_decay"], 1e-12) for r in ok]  # 0 drawn at the axis' floor
    dots = ax.scatter(lr, decay, c=[r["val_acc"][-1] for r in ok], cmap="viridis", vmin=0, vmax=1, s=24)
    bad = [r for r in records if r not in ok]
    if bad:
        ax.scatter([r["config"]["lr"] for r in bad], [max(r["config"]["weight_decay"], 1e-12) for r in bad],
                   marker="x", color="red", s=24, label="diverged")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("weight decay")
    ax.set_title("validation accuracy", y=1.0)
    fig.colorbar(dots, ax=ax)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
