"""The training figure: a PNG like the book's figs. 4-11 and 4-12, drawn without pyplot."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from fastnet.plots import plot_history  # noqa: E402
from fastnet.train import History  # noqa: E402


def _history(epochs=5, steps=300):
    loss = list(2.3 * np.exp(-np.arange(steps) / 60.0) + 0.05)
    acc = list(np.linspace(0.85, 0.97, epochs))
    return History(loss=loss, epoch_iter=list(range(60, 60 * epochs + 1, 60)), train_acc=acc,
                   test_acc=[a - 0.01 for a in acc], iterations=steps)


def _gray(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def test_png_has_both_panels(tmp_path):
    path = plot_history(_history(), tmp_path / "sub" / "training.png", title="mnist 784-50-10 relu")
    assert path == tmp_path / "sub" / "training.png"
    image = _gray(path)
    assert image.shape == (400, 1100)
    # the loss curve (left) and the accuracy lines (right) are drawn: dark pixels inside
    # both axes, where an empty figure has none
    inside = (slice(75, 320), slice(95, 525)), (slice(75, 320), slice(640, 1065))
    empty = _gray(plot_history(History(), tmp_path / "empty.png"))
    for box in inside:
        assert (image[box] < 200).mean() > 0.002
        assert (empty[box] < 200).mean() == 0


def test_no_pyplot_and_no_backend_change(tmp_path):
    """The figure does not import pyplot, so a user's pyplot backend is left alone."""
    code = textwrap.dedent(f"""
        import sys
        from fastnet.plots import plot_history
        from fastnet.train import History
        plot_history(History(loss=[2.0, 1.0, 0.5], train_acc=[0.9], test_acc=[0.8]),
                     {str(tmp_path / "t.png")!r})
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_without_accuracies(tmp_path):
    """Training with evaluate=False has losses only: the figure is still written."""
    path = plot_history(History(loss=[2.0, 1.5, 1.0]), tmp_path / "t.png")
    assert _gray(path).shape == (400, 1100)


def _worker_history():
    rng = np.random.default_rng(0)
    loss = (2.3 * np.exp(-np.arange(3000) / 300.0) + 0.1 * rng.random(3000)).tolist()
    return History(loss=loss, train_acc=[0.9, 0.95, 0.97], test_acc=[0.9, 0.94, 0.96], iterations=3000)


def test_figure_worker_draws_what_plot_history_draws(tmp_path):
    """FigureWorker: its own process and session (Ctrl-C at the terminal does not reach
    it), ready() does not wait, the PNG is plot_history's byte for byte, close() ends it."""
    import os
    import time

    from fastnet.plots import FigureWorker

    history = _worker_history()
    worker = FigureWorker.start()
    assert worker is not None
    proc = worker._proc
    try:
        assert os.getsid(proc.pid) != os.getsid(0)
        assert worker.ready() is False  # still importing matplotlib: ready() does not wait for it
        deadline = time.time() + 120
        while not worker.ready() and time.time() < deadline:
            time.sleep(0.01)
        assert worker._state == "ready"
        assert worker.plot(history, tmp_path / "w" / "a.png", title="mnist") == tmp_path / "w" / "a.png"
        assert worker.plot(history, tmp_path / "b.png") == tmp_path / "b.png"  # one worker, many figures
    finally:
        worker.close()
    assert proc.returncode == 0 and worker._proc is None
    worker.close()  # twice is fine
    plot_history(history, tmp_path / "here.png", title="mnist")
    assert (tmp_path / "w" / "a.png").read_bytes() == (tmp_path / "here.png").read_bytes()
    assert (tmp_path / "b.png").read_bytes() != (tmp_path / "here.png").read_bytes()  # no title


def test_figure_worker_that_dies_or_fails_draws_here(tmp_path):
    """A worker killed before it draws: the figure is drawn in this process.  A figure
    the worker cannot write: plot_history's own error, raised here."""
    from fastnet.plots import FigureWorker

    history = _worker_history()
    with FigureWorker.start() as worker:
        worker._proc.kill()
        worker._proc.wait()
        path = worker.plot(history, tmp_path / "a.png", title="t")
    assert path.read_bytes() == plot_history(history, tmp_path / "b.png", title="t").read_bytes()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with FigureWorker.start() as worker, pytest.raises(OSError, match="File exists|Not a directory"):
        worker.plot(history, blocker / "a.png")
    with FigureWorker.start() as worker:  # closed while it imports: ended at once
        proc = worker._proc
    assert proc.returncode is not None
