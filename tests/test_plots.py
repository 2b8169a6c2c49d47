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
