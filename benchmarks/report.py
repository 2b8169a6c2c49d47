"""The speed-up report: ``python -m benchmarks.report``.

Measures the headline cases side by side in one process, interleaving the candidates
round by round so that a slow moment of the machine hits all of them alike, and prints
a Markdown table of median times and ratios against the reference (the book's NumPy
code on fastnet's ``numpy`` backend).  Thread counts of every pool are printed with it.

    python -m benchmarks.report            # everything (about 20 minutes)
    python -m benchmarks.report --quick    # fewer rounds, no end-to-end runs
    python -m benchmarks.report --json out.json

Besides the book's net it measures the matrix of nets {784-50-10, 784-100-10,
784-100-100-10, 784-100x5-10} x optimisers {SGD, Momentum, Adam} x data sets {MNIST,
Fashion-MNIST}: a step of fastnet as ``fastnet train`` runs it (cython, float32), of the
Numba backend, of the book's loop on the reference backend (float64) and of PyTorch.

The reference numerical gradient (two full forward passes for each parameter: about
15 s for 784-50-10, minutes for 784-100-100-10) is timed on a random sample of
parameters and scaled to all of them, unless ``--full-numgrad`` runs it whole; the
report says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fastnet
import fastnet.nets
from fastnet import backend
from fastnet.kernels.contract import Act, mlp_size

from . import common

ROOT = Path(__file__).resolve().parent.parent


def measure(cases: dict, rounds: int = 7, round_time: float = 0.25, pause: float = 0.15) -> dict:
    """Median seconds per call of each callable, measured in interleaved rounds.

    Each round runs every candidate for about ``round_time`` seconds, then sleeps
    ``pause`` seconds: NumPy's and SciPy's OpenBLAS (and OpenMP) keep their threads
    spinning for a while after a call, and on 2 cores those spinners would steal the
    next candidate's cores and be charged to it."""
    calls = {}
    for name, fn in cases.items():
        fn()
        fn()
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < 0.05:
            fn()
            n += 1
        per_call = (time.perf_counter() - start) / n
        calls[name] = max(1, int(round_time / per_call))
    samples = {name: [] for name in cases}
    order = list(cases)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            fn, n = cases[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
            time.sleep(pause)
    return {name: statistics.median(values) for name, values in samples.items()}


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


class Table:
    def __init__(self):
        self.rows = []

    def section(self, case: str, results: dict, baseline: str, notes: dict | None = None):
        base = results[baseline]
        for name, seconds in results.items():
            note = (notes or {}).get(name, "")
            self.rows.append((case, name, seconds, base / seconds, note))
            case = ""

    def markdown(self) -> str:
        lines = ["| case | implementation | median | speed-up vs reference | note |",
                 "|---|---|---:|---:|---|"]
        for case, name, seconds, ratio, note in self.rows:
            lines.append(f"| {case} | {name} | {fmt_time(seconds)} | {ratio:.1f}× | {note} |")
        return "\n".join(lines)


def kernels_section(table, rounds):
    x32, t = common.batch(np.float32)
    scores = np.random.default_rng(1).standard_normal((100, 10)).astype(np.float32)
    cases = {}
    for name in common.BACKENDS:
        k = common.require_backend(name)
        y, dx = np.empty_like(scores), np.empty_like(scores)

        def softmax_loss(k=k, y=y, dx=dx):
            k.softmax_loss_labels(scores, t, y)
            k.softmax_loss_backward_labels(y, t, 1.0, dx)

        cases[name] = softmax_loss
    table.section("softmax-with-loss forward+backward, 100×10 float32", measure(cases, rounds), "numpy")
    W = (0.01 * np.random.default_rng(2).standard_normal((784, 50))).astype(np.float32)
    b = np.zeros(50, np.float32)
    out = np.empty((100, 50), np.float32)
    tables = {name: common.require_backend(name) for name in common.BACKENDS}
    cases = {name: (lambda k=k: k.affine_relu(x32, W, b, out)) for name, k in tables.items()}
    table.section("affine+ReLU forward, 100×784 · 784×50 float32", measure(cases, rounds), "numpy")


def gradient_section(table, rounds):
    for dtype in ("float32", "float64"):
        x, t = common.batch(dtype)
        cases = {}
        for name in common.BACKENDS:
            common.require_backend(name)
            with fastnet.use_backend(name):
                net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0, dtype=dtype)

            def gradient(net=net, name=name, x=x, t=t):
                with fastnet.use_backend(name):
                    net.gradient(x, t)

            cases[name] = gradient
        notes = {"numpy": "the book's layers", "numba": "one mlp_gradient call",
                 "cython": "one mlp_gradient call" + (", the first layer over the non-zeros"
                                                      if dtype == "float32" and _cython_nonzeros() else "")}
        table.section(f"TwoLayerNet.gradient, batch 100, {dtype}", measure(cases, rounds), "numpy", notes)


def _cython_nonzeros() -> bool:
    """Whether the Cython mlp_gradient runs the first layer over the non-zeros here."""
    try:
        from fastnet.kernels import _cython
    except ImportError:
        return False
    return _cython.NZ_READY


def evaluation_section(table, rounds):
    """The accuracy over the 60,000 training images after each epoch (17 of them in the
    chapter-5 experiment), each backend as the Trainer runs it."""
    (x, t), _ = common.mnist_pixels()
    cases = {name: common.EpochEvaluation(name, x, t) for name in common.BACKENDS}
    notes = {"numpy": "predict_mlp, dense forward in chunks of 2,000 rows",
             "numba": "CSR rows, sparse_predict_mlp", "cython": "CSR rows, sparse_predict_mlp"}
    table.section("epoch evaluation: accuracy on the 60,000 training images, 784-50-10 float32",
                  measure(cases, rounds), "numpy", notes)


# the reference of the step table: the loop of the book's ch05/train_neuralnet.py
BOOK_LOOP = "book's loop as printed (ch05), numpy float64"


def step_section(table, rounds):
    (x, t), _ = common.mnist_pixels()
    x32 = (x / np.float32(255)).astype(np.float32)
    cases = {
        BOOK_LOOP: common.BookLoop(x, t),
        "book loop without the loss line, numpy float64": common.BookStep("numpy", "float64", x, t),
        "book loop without the loss line, numpy float32": common.BookStep("numpy", "float32", x, t),
        "book loop without the loss line, cython float32": common.BookStep("cython", "float32", x, t),
        "engine, cython float32, dense rows": common.EngineSteps("cython", "float32", x, t, sparse=False),
        "engine, cython float32, dense float X": common.EngineSteps("cython", "float32", x32, t, sparse=False),
        "engine, numba float32, CSR rows": common.EngineSteps("numba", "float32", x, t, sparse=True),
        "engine, cython float32, CSR rows": common.EngineSteps("cython", "float32", x, t, sparse=True),
    }
    notes = {name: "uint8 pixels, normalised on the fly; 100 steps a call" for name in cases if "engine" in name}
    notes[BOOK_LOOP] = "float64 pixels, one-hot labels, gradient, update, loss (a second forward)"
    notes["book loop without the loss line, numpy float64"] = "gradient and update only"
    notes["book loop without the loss line, cython float32"] = "net.gradient: one mlp_gradient call" + (
        ", the first layer over the non-zeros" if _cython_nonzeros() else "")
    notes["engine, cython float32, dense float X"] = "float32 rows; 100 steps a call"
    notes["engine, cython float32, CSR rows"] = "fastnet train's path: CSR rows, 100 steps a call"
    notes["engine, numba float32, CSR rows"] = "fastnet train --backend numba"
    try:
        cases["PyTorch 2.13 CPU float32"] = common.TorchStep(x, t)
    except NotImplementedError as exc:
        notes["PyTorch"] = str(exc)
    results = measure(cases, rounds)
    results = {name: seconds / getattr(cases[name], "steps", 1) for name, seconds in results.items()}
    table.section("training step 784-50-10, batch 100 (draw + gradient + SGD)", results, BOOK_LOOP, notes)
    return results


def matrix_section(rounds):
    """Every net x optimiser x data set: a step of fastnet (as fastnet train runs it:
    cython, float32, the Trainer's sparse rule, 100 steps a call) and of the Numba
    backend, beside the book's loop on the reference backend (float64: gradient,
    optimizer.update and the loss line of chapters 5 and 6; also timed without the loss
    line) and PyTorch CPU (float32), interleaved within each cell."""
    rows = []
    for data in ("mnist", "fashion"):
        (x, t), _ = common.mnist_pixels(fashion=data == "fashion")
        for net, hidden in common.NETS.items():
            for optimizer in common.OPTIMIZERS:
                cases = {"fastnet": common.EngineSteps("cython", "float32", x, t, hidden, optimizer),
                         "numba": common.EngineSteps("numba", "float32", x, t, hidden, optimizer),
                         "reference": common.BookStep("numpy", "float64", x, t, hidden, optimizer, loss_line=True),
                         "reference without the loss line": common.BookStep("numpy", "float64", x, t, hidden,
                                                                            optimizer)}
                try:
                    cases["pytorch"] = common.TorchStep(x, t, hidden, optimizer)
                except NotImplementedError:
                    pass
                per_step = {name: seconds / getattr(cases[name], "steps", 1)
                            for name, seconds in measure(cases, rounds, round_time=0.2).items()}
                rows.append({"data": data, "net": net, "optimizer": optimizer,
                             "sparse": cases["fastnet"].sparse, **per_step})
                print(f"matrix {data} {net} {optimizer}: " + ", ".join(f"{k} {fmt_time(v)}" for k, v in
                                                                         per_step.items()), file=sys.stderr)
    return rows


def matrix_markdown(rows) -> str:
    lines = ["| data | net | optimizer | fastnet (cython f32) | × reference | × PyTorch | numba f32 | numba × ref "
             "| reference: book's loop (numpy f64) | × ref. without its loss line | PyTorch f32 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fast, torch = r["fastnet"], r.get("pytorch")
        vs_torch = f"{torch / fast:.1f}×" if torch else "-"
        lines.append(
            f"| {r['data']} | {r['net']} | {r['optimizer']} | {fmt_time(fast)}{' (CSR)' if r['sparse'] else ''} | "
            f"{r['reference'] / fast:.1f}× | {vs_torch} | {fmt_time(r['numba'])} | "
            f"{r['reference'] / r['numba']:.1f}× | {fmt_time(r['reference'])} | "
            f"{r['reference without the loss line'] / fast:.1f}× | {fmt_time(torch) if torch else '-'} |")
    return "\n".join(lines)


def wide_section(table, rounds):
    """A step of the wide nets (common.WIDE_NETS, SGD, MNIST) as fastnet train runs it,
    beside the Numba backend, the book's loop on the reference backend (float64, with its
    loss line) and PyTorch, interleaved within each net."""
    (x, t), _ = common.mnist_pixels()
    for net, hidden in common.WIDE_NETS.items():
        cases = {"fastnet (cython f32)": common.EngineSteps("cython", "float32", x, t, hidden, steps=20),
                 "numba f32": common.EngineSteps("numba", "float32", x, t, hidden, steps=20),
                 "reference": common.BookStep("numpy", "float64", x, t, hidden, loss_line=True)}
        try:
            cases["PyTorch 2.13 CPU float32"] = common.TorchStep(x, t, hidden)
        except NotImplementedError:
            pass
        results = {name: seconds / getattr(cases[name], "steps", 1)
                   for name, seconds in measure(cases, rounds, round_time=0.2).items()}
        notes = {"fastnet (cython f32)": "CSR rows, 20 steps a call", "numba f32": "CSR rows, 20 steps a call",
                 "reference": "the book's loop (numpy f64): gradient, update, loss line"}
        if "PyTorch 2.13 CPU float32" in results:  # that row's own ratio is PyTorch's against the reference
            vs_torch = results["PyTorch 2.13 CPU float32"] / results["fastnet (cython f32)"]
            notes["fastnet (cython f32)"] += f"; {vs_torch:.1f}× PyTorch"
        table.section(f"training step {net}, SGD, batch 100", results, "reference", notes)


def numgrad_section(table, full: bool):
    x, t = common.batch(np.float64, seed=3)
    extra = {}
    for label, sizes in (("784-50-10", (784, 50, 10)), ("784-100-100-10", (784, 100, 100, 10))):
        sizes = np.array(sizes)
        theta = 0.1 * np.random.default_rng(0).standard_normal(mlp_size(sizes))
        grad = np.empty_like(theta)
        results, notes = {}, {}
        if full:
            start = time.perf_counter()
            backend.load("numpy").numerical_gradient_mlp(x, t, sizes, Act.RELU, theta, 1e-4, grad)
            results["reference loop (the book's)"] = time.perf_counter() - start
            notes["reference loop (the book's)"] = f"all {theta.size:,} parameters"
        else:
            sample = 400
            results["reference loop (the book's)"] = common.reference_numgrad_seconds(x, t, sizes, theta, sample)
            notes["reference loop (the book's)"] = f"{sample} parameters timed, scaled to {theta.size:,}"
        for name in ("numba", "cython"):
            k = common.require_backend(name)
            k.numerical_gradient_mlp(x, t, sizes, Act.RELU, theta, 1e-4, grad)  # warm up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                k.numerical_gradient_mlp(x, t, sizes, Act.RELU, theta, 1e-4, grad)
                times.append(time.perf_counter() - start)
            results[name] = statistics.median(times)
        table.section(f"numerical gradient, {label}, batch 100, float64", results, "reference loop (the book's)",
                      notes)
    from fastnet.gradient import gradcheck

    with fastnet.use_backend("cython"):
        report = gradcheck(fastnet.nets.TwoLayerNet(784, 50, 10, seed=0), x, t)
    extra.update(gradcheck_seconds=report.seconds, gradcheck_passed=report.passed)
    return extra


def _run(cmd, env=None):
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def compile_section():
    """Numba: first use with a cold cache, then with the cache warm (new processes)."""
    code = (
        "import time; t0 = time.perf_counter(); import numpy as np, fastnet; "
        "from benchmarks.common import EngineSteps; fastnet.set_backend('numba'); "
        "x = np.zeros((200, 784), np.uint8); t = np.zeros(200, np.int64); "
        "EngineSteps('numba', 'float32', x, t, sparse=True)(); print(time.perf_counter() - t0)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold = float(_run([sys.executable, "-c", code], env)[1])
        warm = float(_run([sys.executable, "-c", code], env)[1])
    return {"cold": cold, "warm": warm}


TORCH_TRAIN = r"""
import sys, time
t0 = time.perf_counter()
import numpy as np, torch
from fastnet.datasets import load_mnist
data, hidden, iters = sys.argv[1], [int(h) for h in sys.argv[2].split(",")], int(sys.argv[3])
(x, t), (xt, tt) = load_mnist(normalize=False, data_dir=data or None)
x = torch.from_numpy(x.astype(np.float32) / np.float32(255)); t = torch.from_numpy(t.astype(np.int64))
xt = torch.from_numpy(xt.astype(np.float32) / np.float32(255)); tt = torch.from_numpy(tt.astype(np.int64))
torch.manual_seed(0)
sizes = [784, *hidden, 10]
layers = []
for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
model = torch.nn.Sequential(*layers)
opt = torch.optim.SGD(model.parameters(), lr=0.1); loss_fn = torch.nn.CrossEntropyLoss()
gen = torch.Generator().manual_seed(0)
for i in range(1, iters + 1):
    idx = torch.randint(0, 60000, (100,), generator=gen)
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x[idx]), t[idx]).backward()
    opt.step()
    if i % 600 == 0 or i == iters:
        with torch.no_grad():
            train_acc = (model(x).argmax(1) == t).float().mean().item()
            test_acc = (model(xt).argmax(1) == tt).float().mean().item()
print(test_acc)
"""


def _e2e(table, case, commands, baseline, rounds):
    """Whole commands, start to exit: each ``rounds`` times, interleaved (one of each, then
    again), the median taken; the note gives the range, since on a shared 2-core machine
    one run can take a third longer than the next."""
    times = {label: [] for label in commands}
    accuracy = {}
    for _ in range(rounds):
        for label, cmd in commands.items():
            seconds, stdout = _run(cmd)
            times[label].append(seconds)
            if label.startswith("PyTorch"):
                accuracy[label] = f"test acc {float(stdout.strip()):.4f}"
            else:
                last = stdout.strip().splitlines()[-1]
                accuracy[label] = "test acc " + last.split(", test acc ")[-1].split(";")[0]
    results = {label: statistics.median(values) for label, values in times.items()}
    notes = {label: f"{accuracy[label]}; {len(values)} runs {min(values):.2f}-{max(values):.2f} s"
             for label, values in times.items()}
    table.section(case, results, baseline, notes)
    return results


def _train_commands(out, hidden="50", extra=()):
    data = str(common.SHARED) if common.SHARED.exists() else ""
    base = [sys.executable, "-m", "fastnet", "train", "--out", out, "--no-progress", "--no-plot" if extra else "",
            "--hidden", hidden, *extra]
    base = [a for a in base if a]
    if data:
        base += ["--data-dir", data]
    commands = {"fastnet train --backend numpy --dtype float64": base + ["--backend", "numpy", "--dtype", "float64"],
                "fastnet train (auto: cython, float32)": base,
                "fastnet train --backend numba": base + ["--backend", "numba"]}
    if common.try_torch() is not None:
        iters = extra[extra.index("--iters") + 1] if "--iters" in extra else "10000"
        commands["PyTorch 2.13 CPU, same run"] = [sys.executable, "-c", TORCH_TRAIN, data, hidden, iters]
    return commands


def e2e_section(table, rounds: int = 5):
    """The chapter-5 experiment as whole commands (10,000 iterations, 17 evaluations, the
    figure)."""
    with tempfile.TemporaryDirectory() as out:
        return _e2e(table, "chapter-5 experiment, whole command (10,000 iterations + 17 evaluations)",
                    _train_commands(out), "fastnet train --backend numpy --dtype float64", rounds)


def nets_e2e_section(table, rounds: int = 3):
    """Each net of the matrix as a whole ``fastnet train`` command with SGD on MNIST:
    3,000 iterations (5 evaluations), He initial weights, no figure."""
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for net, hidden in common.NETS.items():
            commands = _train_commands(out, ",".join(map(str, hidden)),
                                       ("--iters", "3000", "--weight-init-std", "he"))
            results[net] = _e2e(table, f"whole command, {net}, SGD, 3,000 iterations", commands,
                                "fastnet train --backend numpy --dtype float64", rounds)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds; skip compile and end-to-end runs")
    parser.add_argument("--full-numgrad", action="store_true", help="time the reference numerical gradient whole")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 9
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(var):
            print(f"note: {var}={os.environ[var]} is set; it slows current NumPy (see benchmarks/README.md)",
                  file=sys.stderr)
    if not args.quick:
        numba_compile = compile_section()  # first: new processes, before this one loads anything
    backend.load("numba").warmup()
    table = Table()
    kernels_section(table, rounds)
    gradient_section(table, rounds)
    step_section(table, rounds)
    evaluation_section(table, rounds)
    extra = numgrad_section(table, args.full_numgrad)
    wide_section(table, rounds)
    matrix = matrix_section(3 if args.quick else 5)
    if not args.quick:
        e2e_section(table)
        nets_e2e_section(table)
    threads = common.thread_info()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"## fastnet speed-up report\n\nMachine: {cpu}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, NumPy {np.__version__}, fastnet {fastnet.__version__}.  "
          f"Threads: {', '.join(f'{k} {v}' for k, v in threads.items())}.\n")
    print(table.markdown())
    print()
    print(matrix_markdown(matrix))
    print()
    if not args.quick:
        print(f"Numba first use (import + compile + one step): cold cache {numba_compile['cold']:.2f} s, "
              f"warm cache {numba_compile['warm']:.2f} s.")
    print(f"gradcheck of TwoLayerNet(784,50,10) on 100 images: {extra['gradcheck_seconds']:.3f} s "
          f"({'passed' if extra['gradcheck_passed'] else 'FAILED'}).")
    if args.json:
        payload = {"rows": [dict(zip(("case", "name", "seconds", "ratio", "note"), r)) for r in table.rows],
                   "matrix": matrix, "threads": threads, "cpu": cpu, **extra}
        if not args.quick:
            payload["numba_compile"] = numba_compile
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
