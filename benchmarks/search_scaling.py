"""How the search scales: ``python -m benchmarks.search_scaling [--trials 8] [--epochs 50]``.

The book's chapter-6 search (784-100x6-10, weight decay, lr 10^U(-6,-2), decay
10^U(-8,-4), batch 100, 50 epochs) timed three ways on the same trials:

* a plain loop: :func:`fastnet.search.run_trial` called in this process, one thread;
* ``fastnet.search.search`` on a LocalCluster of 1 worker, and of 2 workers.

Printed: trials per minute of each, the scaling from 1 to 2 workers, and Dask's overhead
per trial, (wall of the 1-worker search - the loop's wall) / trials, against a trial's
time.  ``--train-size 500`` is the book's (400 training images); ``--train-size 0``
takes the whole training set (48,000 images; give fewer ``--epochs``).
``--backend numpy`` times the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

# the loop runs as Dask's workers do: single-threaded BLAS (their nanny sets these too)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402  (after the thread settings)

from fastnet import search as s  # noqa: E402
from fastnet.datasets import load_mnist  # noqa: E402

from .common import SHARED  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--train-size", type=int, default=500)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    (x, t), _ = load_mnist(normalize=False, data_dir=os.environ.get("FASTNET_DATA") or SHARED)
    space = s.Space(lr=s.parse_range("1e-6:1e-2:log"), weight_decay=s.parse_range("1e-8:1e-4:log"),
                    hidden=s.parse_hidden("100,100,100,100,100,100"))
    size = args.train_size or None
    data = s.split(x, t, size, 0.2, 0)
    data["classes"] = 10
    jobs = [{"trial": i, "config": space.trial(0, i)} for i in range(args.trials)]
    run = {"epochs": args.epochs, "backend": args.backend}

    start = time.perf_counter()
    loop = [s.run_trial(job, data, args.epochs, args.backend) for job in jobs]
    walls = {"loop": time.perf_counter() - start}
    in_worker = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            records = s.search(x, t, space, trials=args.trials, epochs=args.epochs, train_size=size, out=out,
                               workers=workers, backend=args.backend)
            walls[f"{workers} worker{'s' * (workers > 1)}"] = time.perf_counter() - start
        assert [r["config"] for r in records] == [r["config"] for r in loop], "not the same trials"
        in_worker[workers] = sum(r["seconds"] for r in records)
    from distributed import Client, LocalCluster

    start = time.perf_counter()  # what a search pays once: a 1-worker cluster up and down
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster):
        pass
    startup = time.perf_counter() - start
    trial = float(np.mean([r["seconds"] for r in loop]))
    overhead = (walls["1 worker"] - walls["loop"]) / args.trials
    # outside the trials: sending them, fetching results, each worker's first imports and data
    per_trial = (walls["1 worker"] - startup - in_worker[1]) / args.trials
    slower = in_worker[1] / sum(r["seconds"] for r in loop) - 1  # inside: a trial in a worker
    figures = {
        **run, "trials": args.trials, "train_images": len(data["x_train"]), "cores": len(os.sched_getaffinity(0)),
        "seconds_per_trial": trial, "wall": walls,
        "trials_per_minute": {k: 60 * args.trials / v for k, v in walls.items()},
        "scaling_1_to_2_workers": walls["1 worker"] / walls["2 workers"],
        "dask_overhead_per_trial": overhead, "dask_overhead_fraction": overhead / trial,
        "cluster_startup": startup, "dispatch_per_trial": per_trial, "trial_slower_in_worker": slower,
    }
    print(f"{args.trials} trials of the book's search, {args.epochs} epochs on {len(data['x_train'])} images, "
          f"backend {args.backend}: {trial:.2f} s a trial in the loop")
    for name, wall in walls.items():
        print(f"  {name:9s} {wall:7.1f} s  {figures['trials_per_minute'][name]:6.1f} trials/min")
    print(f"  scaling 1 -> 2 workers: {figures['scaling_1_to_2_workers']:.2f}x")
    print(f"  Dask's overhead against the loop: {overhead:.3f} s a trial ({overhead / trial:.1%} of a trial), of which "
          f"the cluster's start {startup:.1f} s once, dispatch {per_trial:.4f} s a trial ({per_trial / trial:.1%}), "
          f"and a trial in a worker {slower:+.1%} against the loop's")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)


if __name__ == "__main__":
    main()
