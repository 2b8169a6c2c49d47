"""Figures like the book's: the loss curve (fig. 4-11) and train/test accuracy (fig. 4-12).

The figure is drawn with matplotlib's object API (``Figure`` and the Agg canvas), not
``pyplot``: no global figure state, nothing left open, safe in any thread, and 0.03 to
0.08 s less to import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _matplotlib():
    """The three names the figure needs (importing them is most of matplotlib: 0.3-0.4 s
    of a core here)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('plotting needs matplotlib: pip install "fastnet[plot]"') from exc
    return FigureCanvasAgg, Figure, MaxNLocator


def plot_history(history, path, title: str = "") -> Path:
    """Save a PNG with the loss per iteration and the accuracy per epoch.

    Needs matplotlib (``pip install "fastnet[plot]"``); raises ImportError saying so.
    """
    FigureCanvasAgg, Figure, MaxNLocator = _matplotlib()
    path = Path(path)
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(range(1, len(history.loss) + 1), history.loss, linewidth=0.6)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss")
    # titles at y=1.0 given, not left to matplotlib: it would measure every axis's ticks
    # (two get_tightbbox calls, 10% of the draw) to lift them over decorations above the
    # axes, which these figures do not have; the PNG is byte for byte the same
    ax_loss.set_title("training loss (mini-batch)", y=1.0)
    epochs = range(1, len(history.train_acc) + 1)
    if history.train_acc:
        ax_acc.plot(epochs, history.train_acc, marker="o", label="train acc")
    if history.test_acc:
        ax_acc.plot(epochs, history.test_acc, marker="s", linestyle="--", label="test acc")
    ax_acc.set_xlabel("epochs")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 2.5
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.0)
    if history.train_acc or history.test_acc:
        ax_acc.legend(loc="lower right")
    ax_acc.set_title("accuracy", y=1.0)
    if title:
        fig.suptitle(title)
    # fixed margins rather than tight_layout(), which lays the text out once more to
    # measure it (a third of the figure's 0.15 s here); they hold the tick labels of
    # losses and accuracies and the labels and titles above
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.125, top=0.84 if title else 0.9, wspace=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1 rather than 6: a file of lines on white is hardly larger, and written
    # in a third of the time
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
    return path


class FigureWorker:
    """:func:`plot_history` in a Python process of its own, started early so that it
    imports matplotlib on a core the caller leaves free, while the caller goes on
    (``fastnet train`` starts one before it loads the data and draws the figure with it
    at the end).

    The worker says when its import is done (:meth:`ready`, which does not wait); then
    :meth:`plot` sends it the history and waits for the PNG, which is the one
    :func:`plot_history` writes.  Whatever goes wrong in the worker (it could not start,
    import or draw, or it died), :meth:`plot` draws in this process instead, with
    :func:`plot_history`'s errors.  The worker ignores Ctrl-C (its own session) and ends
    when :meth:`close` is called or this process ends.
    """

    def __init__(self):
        root = str(Path(__file__).resolve().parent.parent)  # the same fastnet, whatever the cwd
        code = f"import sys; sys.path.insert(0, {root!r}); from fastnet.plots import _serve; _serve()"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      bufsize=0, start_new_session=True)
        self._state = "importing"  # then "ready", or "broken" (plot() draws here)

    @classmethod
    def start(cls):
        """A new worker, or ``None`` where one cannot run: no matplotlib to import, no
        interpreter to start (embedded Python), not POSIX, or the start failed."""
        import importlib.util

        if os.name != "posix" or not sys.executable or importlib.util.find_spec("matplotlib") is None:
            return None
        try:
            return cls()
        except OSError:
            return None

    def _answer(self, wait: bool):
        """The worker's next line (without waiting unless ``wait``), ``""`` for none yet,
        ``None`` when it is gone."""
        import select

        if not wait and not select.select([self._proc.stdout], [], [], 0)[0]:
            return ""
        try:
            line = self._proc.stdout.readline()
        except OSError:
            return None
        return line.decode(errors="replace").strip() if line else None

    def ready(self) -> bool:
        """Whether the worker no longer needs a core to import (it is ready, or it failed:
        then :meth:`plot` draws here).  Does not wait."""
        if self._state == "importing":
            answer = self._answer(wait=False)
            if answer != "":
                self._state = "ready" if answer == "ready" else "broken"
        return self._state != "importing"

    def plot(self, history, path, title: str = "") -> Path:
        """:func:`plot_history` by the worker (waiting for its import if need be); here
        if the worker cannot."""
        path = Path(path)
        if self._state == "importing":
            self._state = "ready" if self._answer(wait=True) == "ready" else "broken"
        if self._state == "ready":
            accuracies = {k: [float(v) for v in getattr(history, k)] for k in ("train_acc", "test_acc")}
            request = json.dumps({"path": str(path.absolute()), "title": title,
                                  "loss": [float(v) for v in history.loss], "accuracies": accuracies}) + "\n"
            try:
                self._proc.stdin.write(request.encode())
                self._proc.stdin.flush()
                if self._answer(wait=True) == "ok":
                    return path
            except OSError:  # it died: BrokenPipeError
                pass
            self._state = "broken"
        return plot_history(history, path, title)

    def close(self) -> None:
        """End the worker (at once when it is still importing)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._state == "importing":
            proc.kill()
        try:
            proc.stdin.close()  # the worker's loop ends with its input
        except OSError:
            pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_proc", None) is not None:
            self._proc.kill()


def _serve():
    """The worker's side of :class:`FigureWorker`: import, say "ready" (or "failed"),
    then draw one figure per request line and answer "ok" (or "error ...") until its
    input ends.  It ends without the interpreter's teardown of the ~900 modules that
    matplotlib brings (0.1 s here, which the caller would wait for), and quietly when
    the caller is gone (a closed pipe)."""
    import signal
    from types import SimpleNamespace

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "w")  # stdout is the channel; anything printed goes to stderr
    os.dup2(2, 1)
    try:
        try:
            _matplotlib()
        except ImportError as exc:
            answers.write(f"failed {exc}\n")
            answers.flush()
            return
        answers.write("ready\n")
        answers.flush()
        for line in sys.stdin:
            try:
                request = json.loads(line)
                history = SimpleNamespace(loss=request["loss"], **request["accuracies"])
                plot_history(history, request["path"], request["title"])
                answers.write("ok\n")
            except Exception as exc:  # noqa: BLE001 - the caller draws again itself, with the real error
                answers.write(f"error {type(exc).__name__}: {exc}".replace("\n", " ") + "\n")
            answers.flush()
    except OSError:  # the caller is gone: nobody to answer
        pass
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(0)
