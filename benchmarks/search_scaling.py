"""How the search scales: ``python -m benchmarks.search_scaling [--trials 8] [--epochs 50]``.

The book's chapter-6 search (784-100x6-10, weight decay, lr 10^U(-6,-2), decay
10^U(-8,-4), batch 100, 50 epochs) timed three ways on the same trials:

* a plain loop: :func:`fastnet.search.run_trial` called in this process, one thread;
* ``fastnet.search.search`` on a LocalCluster of 1 worker, and of 2 workers.

Printed: trials per minute of each, the scaling from 1 to 2 workers, and Dask's overhead
per trial: each trial run in this process and then sent to a warm 1-worker cluster and
waited for, alternately, the mean difference against a trial's time.
``--train-size 500`` is the book's (400 training images); ``--train-size 0``
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
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            records = s.search(x, t, space, trials=args.trials, epochs=args.epochs, train_size=size, out=out,
                               workers=workers, backend=args.backend)
            walls[f"{workers} worker{'s' * (workers > 1)}"] = time.perf_counter() - start
        assert [r["config"] for r in records] == [r["config"] for r in loop], "not the same trials"
    # Dask's overhead, paired: each trial in the loop, then the same trial sent to a warm
    # 1-worker cluster and waited for, alternately (the host's drift cancels out)
    from distributed import Client

    start = time.perf_counter()
    cluster = s.local_cluster(1)
    client = Client(cluster)
    startup = time.perf_counter() - start
    try:
        [shared] = client.scatter([data], broadcast=True)
        client.submit(s.run_trial, jobs[0], shared, args.epochs, args.backend, pure=False).result()  # imports
        here, there = [], []
        for job in jobs:
            t0 = time.perf_counter()
            s.run_trial(job, data, args.epochs, args.backend)
            t1 = time.perf_counter()
            client.submit(s.run_trial, job, shared, args.epochs, args.backend, pure=False).result()
            here.append(t1 - t0)
            there.append(time.perf_counter() - t1)
    finally:
        client.close()
        cluster.close()
    trial = float(np.mean(here))
    overhead = float(np.mean(np.subtract(there, here)))
    figures = {
        **run, "trials": args.trials, "train_images": len(data["x_train"]), "cores": len(os.sched_getaffinity(0)),
        "seconds_per_trial": trial, "wall": walls,
        "trials_per_minute": {k: 60 * args.trials / v for k, v in walls.items()},
        "scaling_1_to_2_workers": walls["1 worker"] / walls["2 workers"],
        "dask_overhead_per_trial": overhead, "dask_overhead_fraction": overhead / trial, "cluster_startup": startup,
    }
    print(f"{args.trials} trials of the book's search, {args.epochs} epochs on {len(data['x_train'])} images, "
          f"backend {args.backend}: {trial:.2f} s a trial in the loop")
    for name, wall in walls.items():
        print(f"  {name:9s} {wall:7.1f} s  {figures['trials_per_minute'][name]:6.1f} trials/min")
    print(f"  scaling 1 -> 2 workers: {figures['scaling_1_to_2_workers']:.2f}x")
    print(f"  Dask's overhead, each trial in the loop then on a warm worker, alternately: {overhead:+.4f} s a "
          f"trial ({overhead / trial:+.1%}); starting the local cluster: {startup:.1f} s once")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)


if __name__ == "__main__":
    main()
