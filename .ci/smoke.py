"""Smoke test of an installed fastnet wheel: python .ci/smoke.py DATA_DIR

Run outside the source tree, in a venv that has only the wheel and its dependencies:
the package imports from site-packages, all three backends load, the book's chapter-3
weights classify MNIST's test set at the book's 0.9352 on each, and 200 training steps
of the chapter-5 net bring the loss down (and the command line does the same).
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import fastnet
from fastnet import backend
from fastnet.datasets import load_mnist
from fastnet.io import load_book_params
from fastnet.nets import MultiLayerNet, ThreeLayerNet
from fastnet.train import Trainer

data = Path(sys.argv[1])
assert "site-packages" in fastnet.__file__, f"fastnet imported from {fastnet.__file__}"
print(f"fastnet {fastnet.__version__} on Python {sys.version.split()[0]}: {fastnet.__file__}")
assert set(backend.available_backends()) == {"numpy", "numba", "cython"}, backend.available_backends()

(x_train, t_train), (x_test, t_test) = load_mnist(data_dir=data, download=False)
weights = load_book_params(data / "book" / "sample_weight.pkl")
for name in ("numpy", "numba", "cython"):
    with fastnet.use_backend(name):
        net = ThreeLayerNet(weights)
        accuracy = float(np.mean(np.argmax(net.predict(x_test), axis=1) == t_test))
    print(f"   {name:6s} book weights: {accuracy:.4f}")
    assert round(accuracy, 4) == 0.9352, (name, accuracy)

with fastnet.use_backend("cython"):
    net = MultiLayerNet(784, [50], 10, dtype=np.float32, seed=0)
    history = Trainer(net, x_train, t_train, iters=200, seed=0).fit()
losses = history.loss
print(f"   200 steps: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}, "
      f"train acc {history.train_acc[-1]:.3f}")
assert len(losses) == 200 and np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])

with tempfile.TemporaryDirectory() as out:
    command = str(Path(sys.executable).parent / "fastnet")  # the console script beside this venv's python
    run = subprocess.run([command, "train", "--iters", "200", "--no-plot", "--no-progress", "--data-dir", str(data),
                          "--out", out], capture_output=True, text=True)
    assert run.returncode == 0 and "done: 200 iterations" in run.stdout, run.stdout + run.stderr
print("   fastnet train --iters 200: ok")
