"""The speed-up report: ``python -m benchmarks.report``.

Measures the headline cases side by side in one process, interleaving the candidates
round by round so that a slow moment of the machine hits all of them alike, and prints
a Markdown table of median times and ratios against the reference (the book's NumPy
code on fastnet's ``numpy`` backend).  Thread counts of every pool are printed with it.

    python -m benchmarks.report            # everything (3.5 to 5.5 minutes)
    python -m benchmarks.report --quick    # fewer rounds, no end-to-end runs
    python -m benchmarks.report --json out.json

The reference numerical gradient (two full forward passes for each of 39,760
parameters, about 15 s) is timed on a random sample of parameters and scaled to all of
them, unless ``--full-numgrad`` runs it whole; the report says which.
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
        table.section(f"TwoLayerNet.gradient (layer by layer), batch 100, {dtype}",
                      measure(cases, rounds), "numpy")


def evaluation_section(table, rounds):
    """The accuracy over the 60,000 training images after each epoch (17 of them in the
    chapter-5 experiment), each backend as the Trainer runs it."""
    (x, t), _ = common.mnist_pixels()
    cases = {name: common.EpochEvaluation(name, x, t) for name in common.BACKENDS}
    notes = {"numpy": "dense forward in chunks of 2,000 rows",
             "numba": "CSR rows, sparse_predict_2layer", "cython": "CSR rows, sparse_predict_2layer"}
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
        "fused step, numba float32": common.FusedStep("numba", "float32", x, t),
        "fused step, cython float32": common.FusedStep("cython", "float32", x, t),
        "fused step, cython float32 (float X)": common.FusedStep("cython", "float32", x32, t),
        "sparse fused step, numba float32": common.FusedStep("numba", "float32", x, t, sparse=True),
        "sparse fused step, cython float32": common.FusedStep("cython", "float32", x, t, sparse=True),
        "sparse fused, numba float32, 100 steps per call": common.FusedStep("numba", "float32", x, t,
                                                                            sparse=True, steps=100),
        "sparse fused, cython float32, 100 steps per call": common.FusedStep("cython", "float32", x, t,
                                                                             sparse=True, steps=100),
    }
    notes = {name: "uint8 pixels, normalised on the fly" for name in cases if "fused" in name and "float X" not in name}
    notes[BOOK_LOOP] = "float64 pixels, one-hot labels, gradient, update, loss (a second forward)"
    notes["book loop without the loss line, numpy float64"] = "gradient and update only"
    for name in cases:
        if name.startswith("sparse"):
            notes[name] = "pixels as CSR rows: first layer over the non-zeros only"
    notes["sparse fused, cython float32, 100 steps per call"] = (
        "train_steps_2layer_sparse, time per step: fastnet train's path with SGD")
    notes["sparse fused, numba float32, 100 steps per call"] = (
        "train_steps_2layer_sparse, time per step: fastnet train --backend numba")
    try:
        cases["PyTorch 2.13 CPU float32"] = common.TorchStep(x, t)
    except NotImplementedError as exc:
        notes["PyTorch"] = str(exc)
    results = measure(cases, rounds)
    results = {name: seconds / getattr(cases[name], "steps", 1) for name, seconds in results.items()}
    table.section("training step 784-50-10, batch 100 (draw + gradient + SGD)", results, BOOK_LOOP, notes)
    return results


def numgrad_section(table, full: bool):
    x, t = common.batch(np.float64, seed=3)
    net = fastnet.nets.TwoLayerNet(784, 50, 10, seed=0)
    p = net.params
    results, notes = {}, {}
    ref = backend.load("numpy")
    grads = [np.empty_like(v) for v in p.values()]
    if full:
        start = time.perf_counter()
        ref.numerical_gradient_2layer(x, t, *p.values(), 1, 1e-4, *grads)
        results["reference loop (the book's)"] = time.perf_counter() - start
        notes["reference loop (the book's)"] = "all 39,760 parameters"
    else:
        sample = 400
        n_params = sum(v.size for v in p.values())
        results["reference loop (the book's)"] = common.reference_numgrad_seconds(x, t, list(p.values()), sample)
        notes["reference loop (the book's)"] = f"{sample} parameters timed, scaled to {n_params:,}"
    for name in ("numba", "cython"):
        k = common.require_backend(name)
        k.numerical_gradient_2layer(x, t, *p.values(), 1, 1e-4, *grads)  # warm up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            k.numerical_gradient_2layer(x, t, *p.values(), 1, 1e-4, *grads)
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
    table.section("numerical gradient, TwoLayerNet(784,50,10), batch 100, float64", results,
                  "reference loop (the book's)", notes)
    from fastnet.gradient import gradcheck

    with fastnet.use_backend("cython"):
        report = gradcheck(net, x, t)
    return {"gradcheck_seconds": report.seconds, "gradcheck_passed": report.passed}


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
        "from benchmarks.common import FusedStep; fastnet.set_backend('numba'); "
        "x = np.zeros((200, 784), np.uint8); t = np.zeros(200, np.int64); "
        "FusedStep('numba', 'float32', x, t)(); print(time.perf_counter() - t0)"
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
(x, t), (xt, tt) = load_mnist(normalize=False, data_dir=sys.argv[1] or None)
x = torch.from_numpy(x.astype(np.float32) / np.float32(255)); t = torch.from_numpy(t.astype(np.int64))
xt = torch.from_numpy(xt.astype(np.float32) / np.float32(255)); tt = torch.from_numpy(tt.astype(np.int64))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1); loss_fn = torch.nn.CrossEntropyLoss()
gen = torch.Generator().manual_seed(0)
for i in range(1, 10001):
    idx = torch.randint(0, 60000, (100,), generator=gen)
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x[idx]), t[idx]).backward()
    opt.step()
    if i % 600 == 0 or i == 10000:
        with torch.no_grad():
            train_acc = (model(x).argmax(1) == t).float().mean().item()
            test_acc = (model(xt).argmax(1) == tt).float().mean().item()
print(test_acc)
"""


def e2e_section(table, rounds: int = 5):
    """The chapter-5 experiment as whole commands, start to exit: each command ``rounds``
    times, interleaved (one of each, then again), the median taken; the note gives the
    range, since on a shared 2-core machine one run can take a third longer than the next."""
    data = str(common.SHARED) if common.SHARED.exists() else ""
    with tempfile.TemporaryDirectory() as out:
        base = [sys.executable, "-m", "fastnet", "train", "--out", out, "--no-progress"]
        if data:
            base += ["--data-dir", data]
        commands = {"fastnet train --backend numpy --dtype float64":
                    base + ["--backend", "numpy", "--dtype", "float64"],
                    "fastnet train (auto: cython, float32)": base,
                    "fastnet train --backend numba": base + ["--backend", "numba"]}
        if common.try_torch() is not None:
            commands["PyTorch 2.13 CPU, same run"] = [sys.executable, "-c", TORCH_TRAIN, data]
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
    table.section("chapter-5 experiment, whole command (10,000 iterations + 17 evaluations)", results,
                  "fastnet train --backend numpy --dtype float64", notes)
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
            print(f"note: {var}={os.environ[var]} is set; it slows current NumPy (see DESIGN.md)", file=sys.stderr)
    if not args.quick:
        numba_compile = compile_section()  # first: new processes, before this one loads anything
    backend.load("numba").warmup()
    table = Table()
    kernels_section(table, rounds)
    gradient_section(table, rounds)
    step_section(table, rounds)
    evaluation_section(table, rounds)
    extra = numgrad_section(table, args.full_numgrad)
    if not args.quick:
        e2e_section(table)
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
    if not args.quick:
        print(f"Numba first use (import + compile + one step): cold cache {numba_compile['cold']:.2f} s, "
              f"warm cache {numba_compile['warm']:.2f} s.")
    print(f"gradcheck of TwoLayerNet(784,50,10) on 100 images: {extra['gradcheck_seconds']:.3f} s "
          f"({'passed' if extra['gradcheck_passed'] else 'FAILED'}).")
    if args.json:
        payload = {"rows": [dict(zip(("case", "name", "seconds", "ratio", "note"), r)) for r in table.rows],
                   "threads": threads, "cpu": cpu, **extra}
        if not args.quick:
            payload["numba_compile"] = numba_compile
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
