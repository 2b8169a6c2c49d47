"""fastnet search: ranges, the split, and real Dask clusters on loopback.

The cluster tests start real processes: a LocalCluster of two workers, and a
``dask scheduler`` with two ``dask worker`` processes used through ``--scheduler``; one
of those workers is killed (SIGKILL) in the middle of the search, and a search is
interrupted (SIGINT) and resumed.  Every trial must end up in results.jsonl exactly once.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import sigint_default
from fastnet import search as s
from fastnet.cli import main

pytest.importorskip("distributed", reason='the search tests need Dask: pip install "fastnet[search]"')


# ------------------------------------------------------------------ ranges and trials
@pytest.mark.parametrize("text,kind,expected", [
    ("1e-6:1e-2:log", float, s.Range(1e-6, 1e-2, True)),
    ("0:1", float, s.Range(0.0, 1.0)),
    ("1e-4:1e-1:log:4", float, s.Range(1e-4, 1e-1, True, 4)),
    ("0.1,0.01", float, s.Choice((0.1, 0.01))),
    ("100", int, s.Choice((100,))),
    ("2:4", int, s.Choice((2, 3, 4))),
])
def test_parse_range(text, kind, expected):
    assert s.parse_range(text, kind) == expected


@pytest.mark.parametrize("text,kind,message", [
    ("1e-2:1e-6:log", float, "finite LOW <= HIGH"),
    ("0:1:log", float, "LOW > 0"),
    ("abc", float, "neither a range"),
    ("1:2:3:4", float, "neither a range"),
    ("1:4:log", int, "integer options"),
    ("nan:1", float, "finite LOW <= HIGH"),
])
def test_bad_ranges(text, kind, message):
    with pytest.raises(s.SearchError, match=message):
        s.parse_range(text, kind)


def test_trials_are_drawn_the_same_way_every_time():
    space = s.Space(lr=s.parse_range("1e-6:1e-2:log"), weight_decay=s.parse_range("1e-8:1e-4:log"),
                    hidden=s.parse_hidden("100,100/50"))
    trials = [space.trial(7, i) for i in range(200)]
    assert trials == [space.trial(7, i) for i in range(200)]
    assert trials != [space.trial(8, i) for i in range(200)]
    lr = np.log10([t["lr"] for t in trials])
    assert lr.min() >= -6 and lr.max() <= -2 and lr.std() > 0.8  # log-uniform: spread over the decades
    assert {t["hidden"] for t in trials} == {(100, 100), (50,)}
    grid = s.Space(lr=s.parse_range("1e-3:1e-1:log:3"), optimizer=s.Choice(("sgd", "adam"))).grid()
    assert [g["lr"] for g in grid] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2, 0.1, 0.1])
    assert [g["optimizer"] for g in grid] == ["sgd", "adam"] * 3
    with pytest.raises(s.SearchError, match="number of points"):
        s.Space(lr=s.parse_range("1e-3:1e-1:log")).grid()
    with pytest.raises(s.SearchError, match="unknown search options momentum"):
        s.Space(momentum=0.9)


def test_validation_comes_from_the_training_set():
    x = np.arange(1000)[:, None].repeat(3, axis=1)
    t = np.arange(1000) % 10
    data = s.split(x, t, train_size=500, validation=0.2, seed=3)
    train, val = set(data["x_train"][:, 0]), set(data["x_val"][:, 0])
    assert len(train) == 400 and len(val) == 100 and not train & val
    np.testing.assert_array_equal(s.split(x, t, 500, 0.2, 3)["x_val"], data["x_val"])  # same seed, same split
    with pytest.raises(s.SearchError, match="--train-size must be from 2 to the 1000"):
        s.split(x, t, train_size=5000)


def test_results_file_tolerates_a_line_cut_short(tmp_path):
    path = tmp_path / s.RESULTS
    path.write_text(json.dumps({"trial": 1, "val_acc": [0.5]}) + "\n" + '{"trial": 2, "val_')
    assert [r["trial"] for r in s.load_results(path)] == [1]
    path.write_text('{"trial": 2, "val_\n' + json.dumps({"trial": 1}) + "\n")
    with pytest.raises(s.SearchError, match="line 1 is not a trial record"):
        s.load_results(path)


# ------------------------------------------------------------------ on real clusters
def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def _each_trial_once(out, trials):
    ids = [json.loads(line)["trial"] for line in _lines(out / s.RESULTS)]
    assert sorted(ids) == list(range(trials)), ids
    return ids


@pytest.fixture(scope="module")
def mnist_small(mnist_dir):
    from fastnet.datasets import load_mnist

    (x, t), _ = load_mnist(normalize=False, data_dir=mnist_dir.parent, download=False)
    return x, t


def test_local_cluster_of_two_workers(tmp_path, mnist_small):
    x, t = mnist_small
    space = s.Space(lr=s.parse_range("1e-3:1e-1:log"), weight_decay=s.parse_range("1e-8:1e-4:log"),
                    hidden=s.parse_hidden("20,20"))
    seen = []
    records = s.search(x, t, space, trials=6, epochs=2, train_size=400, out=tmp_path, workers=2,
                       on_result=seen.append)
    assert [r["trial"] for r in records] == list(range(6)) and len(seen) == 6
    assert _each_trial_once(tmp_path, 6)
    for r in records:
        assert r["status"] == "ok" and len(r["val_acc"]) == len(r["train_acc"]) == 2
        assert r["config"] == {**space.trial(0, r["trial"]), "hidden": [20, 20]}
    assert len({r["worker"] for r in records}) == 2  # both worker processes ran trials
    with pytest.raises(s.SearchError, match="already holds 6 trials: --resume"):
        s.search(x, t, space, trials=6, epochs=2, train_size=400, out=tmp_path, workers=2)
    again = s.search(x, t, space, trials=8, epochs=2, train_size=400, out=tmp_path, workers=2, resume=True)
    assert [r["trial"] for r in again] == list(range(8)) and _each_trial_once(tmp_path, 8)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds} s for {what}")
        time.sleep(0.05)


@pytest.fixture
def dask_processes(tmp_path):
    """A `dask scheduler` and two `dask worker` processes (no nanny: a killed worker stays
    dead) on 127.0.0.1; yields (address, worker processes)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = open(tmp_path / "dask.log", "w")
    common = dict(stdout=logs, stderr=subprocess.STDOUT)
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], **common)]
    workers = [subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--no-nanny",
                                 "--no-dashboard", "--host", "127.0.0.1"], **common) for _ in range(2)]
    procs += workers
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        logs.close()


def _search_command(out, address, *extra):
    return [sys.executable, "-m", "fastnet", "search", "--scheduler", address, "--out", str(out),
            "--hidden", "100,100", "--lr", "1e-2:1e-1:log", *extra]


def test_scheduler_and_workers_with_one_killed_mid_search(tmp_path, mnist_dir, dask_processes):
    """Through --scheduler; a worker is killed while the trials run: its trial runs again on
    the other, and the file ends with each trial once."""
    address, workers = dask_processes
    out = tmp_path / "run"
    # enough trials that some are left when the first is written, however busy the machine
    search = subprocess.Popen(_search_command(out, address, "--trials", "12", "--epochs", "40", "--train-size", "1500",
                                              "--data-dir", str(mnist_dir.parent)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_lines(out / s.RESULTS)) >= 1 or search.poll() is not None, 240, "the first trial")
    workers[0].send_signal(signal.SIGKILL)  # the trial it was running is lost with it
    workers[0].wait()
    written = len(_lines(out / s.RESULTS))
    stdout, stderr = search.communicate(timeout=300)
    assert search.returncode == 0, stderr
    _each_trial_once(out, 12)
    assert "12 trials in" in stdout and "rank trial val acc" in stdout
    later = [json.loads(line)["worker"] for line in _lines(out / s.RESULTS)[written:]]
    assert later and all(not w.endswith(f":{workers[0].pid}") for w in later)  # all on the worker left
    assert (out / "search.png").stat().st_size > 0 and (out / "scatter.png").stat().st_size > 0


def test_interrupted_search_resumes(tmp_path, mnist_dir, dask_processes):
    address, _ = dask_processes
    out = tmp_path / "run"
    argv = _search_command(out, address, "--trials", "24", "--epochs", "20", "--train-size", "1500",
                           "--data-dir", str(mnist_dir.parent))
    search = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=sigint_default)
    _wait_for(lambda: len(_lines(out / s.RESULTS)) >= 1 or search.poll() is not None, 240, "the first trial")
    search.send_signal(signal.SIGINT)
    _, stderr = search.communicate(timeout=120)
    assert search.returncode == 130, stderr
    assert stderr.strip().endswith("(--resume goes on)") and "Traceback" not in stderr
    before = _lines(out / s.RESULTS)
    assert 1 <= len(before) < 24
    done = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _lines(out / s.RESULTS)[: len(before)] == before  # kept as they were
    _each_trial_once(out, 24)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "1e-2:1e-6:log"], "finite LOW <= HIGH"),
    (["--weight-decay", "x"], "'x' is neither a range"),
    (["--hidden", "0,5"], "hidden sizes must be positive"),
    (["--optimizer", "sgd,rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--activation", "tanh"], "'tanh' is not relu or sigmoid"),
    (["--grid"], "number of points"),
    (["--trials", "0"], "--trials: must be at least 1"),
    (["--train-size", "100000"], "--train-size must be from 2 to the 60000"),
])
def test_search_mistakes_are_one_line(tmp_path, capsys, mnist_dir, argv, message):
    code = None
    try:
        code = main(["search", "--out", str(tmp_path / "r"), "--data-dir", str(mnist_dir.parent), *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_search_without_dask_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["search", "--out", str(tmp_path / "r")]) == 2
    assert 'fastnet search runs on Dask: pip install "fastnet[search]"' in capsys.readouterr().err


def test_scheduler_that_is_not_there(tmp_path, capsys, mnist_dir, monkeypatch):
    import dask

    monkeypatch.setenv("FASTNET_SCHEDULER", f"tcp://127.0.0.1:{_free_port()}")
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = main(["search", "--out", str(tmp_path / "r"), "--trials", "2", "--epochs", "1", "--train-size", "200",
                     "--data-dir", str(mnist_dir.parent)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot reach the Dask scheduler tcp://127.0.0.1:" in err, err
    assert not os.path.exists(tmp_path / "r" / s.RESULTS)
