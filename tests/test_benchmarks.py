"""The benchmark floor stays in step with the kernel contract (run from a source checkout)."""

import sys

import numpy as np
import pytest

from conftest import ROOT

if not (ROOT / "benchmarks" / "report.py").exists():  # pragma: no cover - tests run from an installed wheel
    pytest.skip("benchmarks/ is not beside these tests (installed-package run)", allow_module_level=True)
sys.path.insert(0, str(ROOT))

from benchmarks import common, report  # noqa: E402
from fastnet import backend  # noqa: E402
from fastnet.kernels import contract  # noqa: E402


@pytest.mark.parametrize("name", list(contract.KERNELS))
def test_every_kernel_has_benchmark_arguments(name):
    args = common.kernel_args(name, "float32", n=3, d=12, m=5)
    for table in ("numpy", "cython"):
        getattr(backend.load(table), name)(*args)


def test_measure_and_table():
    results = report.measure({"fast": lambda: None, "slow": lambda: sum(range(2000))}, rounds=3,
                             round_time=0.01, pause=0.0)
    assert results["slow"] > results["fast"] > 0
    table = report.Table()
    table.section("case", results, "slow")
    text = table.markdown()
    assert "| case | fast |" in text and "|  | slow |" in text and "1.0×" in text
    assert report.fmt_time(2.5e-6) == "2.5 µs" and report.fmt_time(0.0123) == "12.3 ms"


def test_step_helpers_run():
    rng = np.random.default_rng(0)
    x = (rng.random((300, 784)) * 255 * (rng.random((300, 784)) < 0.2)).astype(np.uint8)
    t = np.random.default_rng(1).integers(0, 10, 300)
    for sparse in (False, True):
        for hidden, optimizer in (((50,), "sgd"), ((20, 20), "adam")):
            steps = common.EngineSteps("cython", "float32", x, t, hidden, optimizer, sparse=sparse, steps=3)
            assert steps.sparse is sparse and steps() == 3 and np.isfinite(steps.losses).all()
            common.BookStep("numpy", "float64", x, t, hidden, optimizer)()
    assert common.EngineSteps("cython", "float32", x, t).sparse  # the Trainer's rule: pixels 80% zero
    assert not common.EngineSteps("cython", "float32", x | 1, t).sparse


def test_book_loop_is_the_books_loop():
    """common.BookLoop (the step table's reference) runs the loop of the book's
    ch05/train_neuralnet.py: float64 pixels in [0, 1], one-hot labels, and a loss per
    iteration from a forward pass after the update; on learnable data the loss falls."""
    rng = np.random.default_rng(0)
    x = (rng.random((300, 784)) * 255 * (rng.random((300, 784)) < 0.2)).astype(np.uint8)
    t = (x.astype(np.float64) @ rng.standard_normal((784, 10))).argmax(axis=1)
    book = common.BookLoop(x, t)
    assert book.x_train.dtype == np.float64 and book.x_train.max() <= 1.0
    assert book.t_train.shape == (300, 10) and (book.t_train.sum(axis=1) == 1).all()
    before = book.network.params["W1"].copy()
    for _ in range(300):
        book()
    losses = book.train_loss_list
    assert len(losses) == 300 and np.isfinite(losses).all()
    assert not np.array_equal(before, book.network.params["W1"])
    assert np.mean(losses[-30:]) < 0.7 * np.mean(losses[:30])


def test_epoch_evaluation_helper_is_the_trainers_accuracy():
    """common.EpochEvaluation (asv EpochEvaluation and the report's evaluation rows) gives
    the Trainer's accuracy on the training images, the same on every backend."""
    rng = np.random.default_rng(2)
    x = (rng.random((500, 784)) * 255 * (rng.random((500, 784)) < 0.2)).astype(np.uint8)
    t = rng.integers(0, 10, 500)
    helpers = {name: common.EpochEvaluation(name, x, t) for name in ("numpy", "cython")}
    accuracies = {name: helper() for name, helper in helpers.items()}
    net = helpers["numpy"].trainer.net
    scores = net.predict(x.astype(np.float32) / np.float32(255))
    assert accuracies["numpy"] == np.mean(np.argmax(scores, axis=1) == t)  # what the net predicts
    assert abs(accuracies["numpy"] - accuracies["cython"]) <= 1 / 500
