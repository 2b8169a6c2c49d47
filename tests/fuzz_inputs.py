"""Fuzz the installed package with hostile inputs; prints counts, exits 1 on any crash.

    python tests/fuzz_inputs.py [--seed 0] [--idx 2000] [--pickles 2000] [--cli 200] [--kernels 300]

Not a test module (pytest does not collect it): a run takes minutes.  What counts as a
crash: an exception other than the documented one (DatasetError for data files,
UnsafePickleError for pickles), a command that prints a traceback or more than one line
for a user mistake, or exits with a status other than 0, 1, 2; a kernel call (a valid
call of each contract kernel with one or two arguments spoilt: bad labels and indices,
other dtypes, shapes, transposes, NaN, read-only outputs) that kills its process
(each backend's calls run in a child process of their own; an exception is a refusal).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

from fastnet.datasets import FILES, Dataset, DatasetError, load_dataset
from fastnet.io import UnsafePickleError, load_book_params

DATA = Path(os.environ.get("FASTNET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def mutate(data: bytes, rng) -> bytes:
    """One to four random edits: flips, cuts, insertions, repeated runs, header words."""
    data = bytearray(data)
    for _ in range(rng.integers(1, 5)):
        what = rng.integers(6)
        at = int(rng.integers(0, max(len(data), 1)))
        if what == 0 and data:
            data[at] ^= 1 << int(rng.integers(8))
        elif what == 1:
            data = data[:at]
        elif what == 2:
            data[at:at] = rng.bytes(int(rng.integers(1, 64)))
        elif what == 3 and len(data) >= 8:
            word = int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 28, 60000, 10**9])).to_bytes(4, "big")
            start = 4 * int(rng.integers(0, min(len(data) // 4, 5)))
            data[start:start + 4] = word
        elif what == 4:
            data += bytes(int(rng.integers(1, 1 << 16)))
        else:
            data = data[:at] + data[at:at + 64] * int(rng.integers(2, 50)) + data[at + 64:]
    return bytes(data)


def tiny_payloads(rng):
    def idx(array):
        return (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) \
            + array.astype(np.uint8).tobytes()

    return {
        "train_img": idx(rng.integers(0, 256, (6, 28, 28))), "train_label": idx(rng.integers(0, 10, 6)),
        "test_img": idx(rng.integers(0, 256, (4, 28, 28))), "test_label": idx(rng.integers(0, 10, 4)),
    }


def fuzz_idx(n, rng, folder: Path) -> dict:
    """Mutated IDX files (plain and gzip, checksums on and off) through load_dataset."""
    counts = {"files": 0, "loaded": 0, "refused": 0, "crashes": 0}
    for i in range(n):
        payloads = tiny_payloads(rng)
        checked = bool(rng.integers(2))
        spec = Dataset(name="Fuzz", folder="fuzz", mirrors=(),
                       sha256={k: hashlib.sha256(p).hexdigest() for k, p in payloads.items()} if checked else {},
                       counts={"train": 6, "test": 4})
        target = folder / f"run{i}" / "fuzz"
        target.mkdir(parents=True)
        key = str(rng.choice(list(FILES)))
        for k, payload in payloads.items():
            raw = mutate(payload, rng) if k == key else payload
            if rng.integers(3):
                raw = gzip.compress(raw, compresslevel=1)
                if k == key and rng.integers(2):
                    raw = mutate(raw, rng)  # the compressed stream itself
            (target / FILES[k]).write_bytes(raw)
        counts["files"] += 1
        cache = bool(rng.integers(2))
        _tally(counts, DatasetError, lambda spec=spec, folder=target.parent, cache=cache:
               load_dataset(spec, data_dir=folder, download=False, cache=cache))
    return counts


def _tally(counts, refusal, attempt) -> None:
    """Run ``attempt``: loaded when it returns, refused when it raises ``refusal``, a
    crash (with its traceback) when it raises anything else."""
    try:
        attempt()
        counts["loaded"] += 1
    except refusal:
        counts["refused"] += 1
    except Exception:
        counts["crashes"] += 1
        traceback.print_exc()


def fuzz_pickles(n, rng, folder: Path) -> dict:
    """Mutated weight pickles (the book's, and dicts of arrays in every protocol)."""
    seeds = [pickle.dumps({"W1": rng.standard_normal((3, 4)).astype(np.float32), "b1": np.arange(4)}, protocol=p)
             for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    book = DATA / "book" / "sample_weight.pkl"
    if book.exists():
        seeds.append(book.read_bytes())
    counts = {"pickles": 0, "loaded": 0, "refused": 0, "crashes": 0}
    path = folder / "w.pkl"
    def attempt():
        for value in load_book_params(path).values():
            assert value.flags.c_contiguous and value.flags.owndata and value.nbytes <= path.stat().st_size

    for _ in range(n):
        path.write_bytes(mutate(seeds[int(rng.integers(len(seeds)))], rng))
        counts["pickles"] += 1
        _tally(counts, UnsafePickleError, attempt)
    return counts


def fuzz_cli(n, rng, folder: Path) -> dict:
    """Random command lines with hostile values, run in this process."""
    from fastnet.cli import main

    values = ["0", "-1", "1", "3", "1e9", "1000000000", "nan", "inf", "-inf", "x", "", "1,2", "0,5", ",",
              "100,100", "1e-30", "1e30", "2.5", str(folder / "missing"), str(folder), "/dev/null"]
    commands = {
        "train": ["--dataset", "--hidden", "--activation", "--iters", "--epochs", "--batch-size", "--lr",
                  "--optimizer", "--weight-init-std", "--dtype", "--seed", "--out", "--gradient"],
        "evaluate": ["--weights", "--dataset"],
        "predict": ["--weights"],
        "gradcheck": ["--hidden", "--batch-size", "--batches", "--subset", "--dtype", "--seed"],
    }
    counts = {"commands": 0, "exit 0": 0, "exit 1": 0, "exit 2": 0, "crashes": 0}
    for i in range(n):
        command = str(rng.choice(list(commands)))
        argv = [command, "--no-progress", "--no-plot"] if command == "train" else [command]
        size = min(int(rng.integers(1, 4)), len(commands[command]))
        for option in rng.choice(commands[command], size=size, replace=False):
            argv += [str(option), str(rng.choice(values))]
        if command == "train":
            argv += ["--iters", str(int(rng.choice([1, 50, 700]))), "--out", str(folder / f"out{i}")]
        if command == "predict":
            argv += [str(folder / "missing.png")]
        if DATA.exists():
            argv += ["--data-dir", str(DATA)]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        except BaseException:
            code = "exception"
            err.write(traceback.format_exc())
        counts["commands"] += 1
        lines = err.getvalue().strip().splitlines()
        bad = code not in (0, 1, 2) or "Traceback" in err.getvalue() or (code in (1, 2) and len(lines) != 1)
        if bad:
            counts["crashes"] += 1
            print("CRASH", argv, code, err.getvalue(), file=sys.stderr)
        else:
            counts[f"exit {code}"] += 1
    return counts


KERNEL_CHILD = r"""
import sys, warnings
import numpy as np
from fastnet import backend
from fastnet.kernels import contract
from fastnet.kernels.contract import Act, mlp_size
from test_kernel_parity import ELEMENTARY, make_case, _sparse_case

warnings.simplefilter("ignore")
ref = backend.load("numpy")
k = backend.load(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))

def valid_call(name):
    # a correct call of kernel ``name`` (then one argument is spoilt)
    dtype = [np.float32, np.float64][int(rng.integers(2))]
    if name in ELEMENTARY:
        args, _ = make_case(name, int(rng.integers(1, 9)), int(rng.integers(1, 12)), int(rng.integers(1, 9)),
                            dtype, rng)
        return list(args)
    B, D, H, C = int(rng.integers(1, 6)), int(rng.integers(1, 12)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
    X, T, idx, params, work = _sparse_case(dtype, B, D, H, C, N=12, seed=int(rng.integers(2**31)))
    X = X.astype(dtype) if rng.integers(2) else X
    csr = list(ref.sparse_rows(X))
    steps, losses = np.stack([idx, idx]), np.empty(2)
    out = np.empty(3, np.int64)
    hidden = [H] + [int(rng.integers(1, 9)) for _ in range(int(rng.integers(0, 3)))]
    sizes = np.array([D, *hidden, C])
    theta = (0.3 * rng.standard_normal(mlp_size(sizes))).astype(dtype)
    opt = np.array([int(rng.integers(1, 5)), 0.1, 0.9, 0.999, float(rng.integers(2)) * 0.01, 0.0])
    state = np.zeros((2, theta.size), dtype)
    cases = {
        "train_steps_mlp": [X, T, steps, sizes, Act.RELU, theta, opt, state, losses],
        "train_steps_mlp_sparse": [*csr, T, steps, sizes, Act.RELU, theta, opt, state, losses],
        "mlp_gradient": [X, T, idx, sizes, Act.RELU, theta, 0.0, np.empty_like(theta)],
        "predict_mlp": [X, sizes, Act.RELU, theta, np.empty(len(X), np.int64)],
        "sparse_predict_mlp": [*csr, 0, sizes, Act.RELU, theta, out],
        "numerical_gradient_mlp": [X[:B].astype(dtype), T[:B], sizes, Act.RELU, theta, 1e-4, np.empty_like(theta)],
        "sparse_rows": [X],
        "sparse_affine": [*csr, 0, params[0], params[1], Act.RELU, np.empty((3, H), dtype)],
    }
    return cases[name]

def spoil(a):
    # one hostile change to an argument
    if isinstance(a, list):
        a = list(a)
        if a and rng.integers(2):
            a[int(rng.integers(len(a)))] = spoil(a[int(rng.integers(len(a)))])
        else:
            a = a[:-1] if a else [1]
        return a
    if not isinstance(a, np.ndarray):
        return [np.nan, np.inf, -1, 0, 2**40, -(2**40), 7, None, "x"][int(rng.integers(9))]
    what = int(rng.integers(9))
    if what == 0 and a.dtype.kind in "iu":
        b = a.copy().astype(np.int64)
        if b.size:
            b.flat[int(rng.integers(b.size))] = [2**40, -(2**40), -1, 10**12, 11, 2**31][int(rng.integers(6))]
        return b
    if what == 1:
        kinds = [np.float16, np.int32, np.int64, np.uint8, np.float32, np.float64, np.complex64]
        return a.astype(kinds[int(rng.integers(len(kinds)))])
    if what == 2 and a.ndim == 2:
        return a.T
    if what == 3:
        return a.reshape(-1)
    if what == 4 and a.size:
        return a[: int(rng.integers(a.shape[0]))]
    if what == 5 and a.dtype.kind == "f" and a.size:
        b = a.copy()
        b.flat[int(rng.integers(b.size))] = [np.nan, np.inf, -np.inf, 1e38][int(rng.integers(4))]
        return b
    if what == 6:
        return np.zeros((0,) + a.shape[1:], a.dtype)
    if what == 7:
        b = a.copy()
        b.flags.writeable = False
        return b
    return np.concatenate([a, a]) if a.ndim else a

ran = refused = 0
names = list(contract.KERNELS)
for _ in range(int(sys.argv[3])):
    name = names[int(rng.integers(len(names)))]
    args = valid_call(name)
    for _ in range(int(rng.integers(1, 3))):
        i = int(rng.integers(len(args)))
        args[i] = spoil(args[i])
    try:
        getattr(k, name)(*args)
        ran += 1
    except Exception:
        refused += 1
print(ran, refused)
"""


def fuzz_kernels(n, seed) -> dict:
    counts = {"calls": 0, "ran": 0, "raised": 0, "crashes": 0}
    for name in ("numpy", "numba", "cython"):
        result = subprocess.run([sys.executable, "-c", KERNEL_CHILD, name, str(seed), str(n)],
                                capture_output=True, text=True, timeout=1800, cwd=Path(__file__).parent)
        counts["calls"] += n
        if result.returncode != 0:
            counts["crashes"] += 1
            print(f"kernel fuzz on {name}: exit {result.returncode}\n{result.stderr[-3000:]}", file=sys.stderr)
            continue
        ran, refused = map(int, result.stdout.split())
        counts["ran"] += ran
        counts["raised"] += refused
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idx", type=int, default=2000)
    parser.add_argument("--pickles", type=int, default=2000)
    parser.add_argument("--cli", type=int, default=200)
    parser.add_argument("--kernels", type=int, default=300, help="calls per backend")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    crashes = 0
    unraisable = []  # errors raised where Python cannot raise them (freeing an object): crashes too

    def hook(info):
        unraisable.append(info)
        sys.__unraisablehook__(info)

    sys.unraisablehook = hook
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        for what, run in (("IDX files", lambda: fuzz_idx(args.idx, rng, Path(tmp) / "idx")),
                          ("pickles", lambda: fuzz_pickles(args.pickles, rng, Path(tmp))),
                          ("command lines", lambda: fuzz_cli(args.cli, rng, Path(tmp))),
                          ("kernel calls", lambda: fuzz_kernels(args.kernels, args.seed))):
            counts = run()
            crashes += counts["crashes"]
            print(f"{what}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    print(f"errors raised while freeing objects: {len(unraisable)}")
    return 1 if crashes or unraisable else 0


if __name__ == "__main__":
    sys.exit(main())
