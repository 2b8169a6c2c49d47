"""The fastnet command: train, evaluate, predict; one-line errors; Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import sigint_default
from fastnet.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastnet", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_for_every_command(capsys):
    for args in ([], ["train"], ["evaluate"], ["predict"], ["demo"], ["backends"]):
        with pytest.raises(SystemExit) as info:
            main([*args, "--help"])
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--dataset" in out and "--weights" in out and "--optimizer" in out


def test_demo_prints_the_book_numbers(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "[0.31682708 0.69627909]" in out and "price 220" in out


def test_train_evaluate_predict(tmp_path, mnist_dir, capsys, monkeypatch):
    from fastnet.plots import FigureWorker

    workers = []
    start = FigureWorker.start.__func__
    monkeypatch.setattr(FigureWorker, "start", classmethod(lambda cls: workers.append(start(cls)) or workers[-1]))
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(mnist_dir.parent), "--iters", "700", "--out", str(out),
                 "--no-progress", "--backend", "cython"])
    text = capsys.readouterr().out
    assert code == 0, text
    if os.cpu_count() > 1:  # the figure came from its worker, which is gone
        assert len(workers) == 1 and workers[0]._proc is None and workers[0]._state == "ready"
    assert "epoch   1  iter    600" in text and "done: 700 iterations" in text
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "training.png", "weights.npz"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 700 and len(metrics["loss"]) == 700
    assert metrics["test_acc"][-1] > 0.85
    assert main(["evaluate", "--weights", str(out / "weights.npz"), "--data-dir", str(mnist_dir.parent)]) == 0
    text = capsys.readouterr().out
    assert f"accuracy: {metrics['test_acc'][-1]:.4f}" in text and "confusion matrix" in text

    from PIL import Image

    from fastnet.datasets import load_mnist

    _, (x_test, t_test) = load_mnist(normalize=False, flatten=False, data_dir=mnist_dir.parent)
    paths = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(x_test[i, 0]).save(path)
        paths.append(str(path))
    assert main(["predict", "--weights", str(out / "weights.npz"), *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(line.split(": ")[1].split()[0]) for line in lines] == t_test[:3].tolist()  # 7 2 1


def test_evaluate_book_weights(mnist_dir, book_weights, capsys):
    assert main(["evaluate", "--weights", str(book_weights), "--data-dir", str(mnist_dir.parent)]) == 0
    assert "accuracy: 0.9352" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["evaluate", "--weights", "/nonexistent/w.npz"], "no weights file at /nonexistent/w.npz"),
        (["train", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["train", "--backend", "torch"], "unknown backend 'torch'"),
        (["train", "--iters", "5", "--epochs", "1"], "not both"),
    ],
)
def test_user_errors_are_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("fastnet: error:") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_is_one_line(tmp_path, book_weights, capsys, monkeypatch):
    """Good weights, no data and no reachable mirror: the multi-line DatasetError (the
    folders looked in, each mirror's failure, what to do) is printed as one line."""
    from dataclasses import replace

    import fastnet.datasets

    monkeypatch.setattr(fastnet.datasets, "MNIST", replace(fastnet.datasets.MNIST, mirrors=("http://127.0.0.1:9/",)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "data"
    empty.mkdir()
    assert main(["evaluate", "--weights", str(book_weights), "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastnet: error: MNIST: "), err
    for named in (str(empty / "mnist"), str(tmp_path / "cache" / "fastnet" / "mnist"),
                  "http://127.0.0.1:9/train-images-idx3-ubyte.gz", "--data-dir", "FASTNET_DATA"):
        assert named in err, named


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "w.npz"
    bad.write_bytes(b"garbage")
    result = run("evaluate", "--weights", str(bad))
    assert result.returncode == 2 and "not a readable .npz" in result.stderr


def test_ctrl_c_saves_and_exits_130(tmp_path, mnist_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnet", "train", "--data-dir", str(mnist_dir.parent), "--iters", "10000000",
         "--out", str(out), "--no-plot", "--no-progress", "--backend", "numpy", "--dtype", "float64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default,
    )
    deadline = time.time() + 120
    while not (out / "metrics.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and str(out) in stderr and "Traceback" not in stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["iterations"] > 600
    assert np.load(out / "weights.npz")["W1"].shape == (784, 50)


def _children(pid):
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(entry)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker in /proc")
def test_ctrl_c_ends_the_figure_worker(tmp_path, mnist_dir):
    """Ctrl-C while training with the figure's worker process (the default): the same
    clean exit, and the worker (in a session of its own, so the terminal's Ctrl-C does
    not reach it) does not outlive the command."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnet", "train", "--data-dir", str(mnist_dir.parent), "--iters", "10000000",
         "--out", str(out), "--no-progress", "--backend", "cython"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default,
    )
    deadline = time.time() + 120
    while not (out / "metrics.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    if os.cpu_count() > 1:
        assert len(workers) == 1
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_command_exit_runs_exit_handlers_and_flushes(tmp_path):
    """The command skips the interpreter's teardown (fastnet.cli.run): exit handlers still
    run, piped output is complete, the exit status is main()'s."""
    code = ("import atexit, sys; atexit.register(lambda: print('handler ran')); "
            "sys.argv = ['fastnet'] + sys.argv[1:]; from fastnet.cli import run; run()")
    ok = subprocess.run([sys.executable, "-c", code, "demo"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "[0.31682708 0.69627909]" in ok.stdout and ok.stdout.rstrip().endswith("handler ran")
    bad = subprocess.run([sys.executable, "-c", code, "evaluate", "--weights", str(tmp_path / "no.npz")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no weights file" in bad.stderr and "handler ran" in bad.stdout
    # a reader that stops early: no traceback, whether the pipe closes during main() or
    # at the last flush
    head = subprocess.run(f"{sys.executable} -m fastnet demo | head -n 1", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert head.stdout.count("\n") == 1 and "Traceback" not in head.stderr, head.stderr
    early = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
             "sys.argv = ['fastnet', 'demo']; from fastnet.cli import run; run()")
    for unbuffered in ([], ["-u"]):  # -u: the first print inside main() meets the closed pipe
        closed = subprocess.run([sys.executable, *unbuffered, "-c", early], capture_output=True, text=True,
                                timeout=120)
        assert closed.returncode == 141 and "Traceback" not in closed.stderr, closed.stderr


def test_core_share_leaves_a_core_to_the_figure_worker(monkeypatch):
    """While the figure worker imports matplotlib, the kernels use one thread fewer (when
    they would use every core); once it is ready, or when training ends, as many as before."""
    import fastnet
    from fastnet import cli

    class Worker:
        done = False

        def ready(self):
            return self.done

    monkeypatch.setattr(cli, "_cores", lambda: 2)
    with fastnet.use_backend("cython"):
        before = fastnet.set_num_threads(2)
        try:
            worker = Worker()
            share = cli._CoreShare(worker)
            assert fastnet.get_num_threads() == 1
            share(None, {})  # an epoch ends: still importing
            assert fastnet.get_num_threads() == 1
            worker.done = True
            share(None, {})
            assert fastnet.get_num_threads() == 2
            share.restore()
            assert fastnet.get_num_threads() == 2
            cli._CoreShare(Worker()).restore()  # training ended first
            assert fastnet.get_num_threads() == 2
            fastnet.set_num_threads(1)  # a core is free already: nothing to change
            cli._CoreShare(Worker())
            assert fastnet.get_num_threads() == 1
            assert cli._CoreShare(None).previous is None  # no worker
        finally:
            fastnet.set_num_threads(before)


def test_command_names_match_the_library():
    """The command's names of activations and optimisers (kept in cli.py so that
    ``fastnet --help`` imports no numpy) are the library's."""
    from fastnet import cli
    from fastnet.nets import ACTIVATIONS
    from fastnet.optim import OPTIMIZERS

    assert set(cli.ACTIVATIONS) == set(ACTIVATIONS)
    assert set(cli.DEFAULT_LR) == set(OPTIMIZERS)
