"""Hostile input and hard stops: one-line errors for user mistakes, nothing lost or torn.

The command's promises (README): a mistake prints one line, ``fastnet: error: …``,
and exits 2; a run that diverges or learns nothing says so on one line and exits 1
with its weights and metrics kept; Ctrl-C exits 130.  Weights files are never trusted:
a pickle rebuilds nothing but arrays made of its own bytes, an ``.npz`` member must
hold the bytes its header announces, and a net's layer sizes come from its weights.
"""

import errno
import os
import pickle
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from conftest import sigint_default
from fastnet import io as fio
from fastnet.cli import main
from fastnet.io import UnsafePickleError, load_book_params, load_params
from fastnet.nets import MultiLayerNet
from fastnet.train import Trainer, load_net, repair_checkpoint, save_net


def one_line_error(capsys, argv, *expected, code=2):
    """Run ``fastnet argv`` in this process; its stderr is one line holding ``expected``."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


# ------------------------------------------------------------------ weights files
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _small_net_arrays():
    net = MultiLayerNet(784, [5], 10, seed=0)
    return {k: v for k, v in net.params.items()}


@pytest.mark.parametrize("name,arrays,message", [
    ("sizes", dict(__sizes__=np.array([784, 10**12, 10]), __activation__=np.array("relu")),
     "__sizes__ [784, 1000000000000, 10] disagrees with the weights' [784, 5, 10]"),
    ("noact", dict(__sizes__=np.array([784, 5, 10])), None),
    ("wfoo", dict(_only=True, Wfoo=np.ones((2, 2))), "holds no weights W1"),
    ("w1flat", dict(_replace=True, W1=np.ones(784)), "W1 must be a 2-D float array, got shape (784,)"),
    ("chain", dict(_replace=True, W2=np.ones((6, 10))), "W2 has shape (6, 10) but W1 has 5 columns"),
    ("bias", dict(_replace=True, b1=np.ones(3)), "b1 must have shape (5,)"),
    ("extra", dict(W7=np.ones((2, 2))), "unexpected entries W7"),
    ("nan", dict(_replace=True, b2=np.array([np.nan] + [0.0] * 9)), "b2 contains nan at index (0,)"),
])
def test_evaluate_refuses_bad_weights(tmp_path, capsys, name, arrays, message):
    arrays = dict(arrays)
    only = arrays.pop("_only", False)
    arrays.pop("_replace", None)  # (these entries replace the net's own: the update below)
    content = {} if only else _small_net_arrays()
    content.update(arrays)
    path = _npz(tmp_path / f"{name}.npz", **content)
    if message is None:  # no __activation__: read as relu, as a plain W1, b1, ... file
        assert load_net(path).activation == "relu"
        return
    one_line_error(capsys, ["evaluate", "--weights", path, "--data-dir", str(tmp_path)], message)


def test_npz_member_claiming_a_terabyte_is_refused_unread(tmp_path, capsys):
    """A member whose header announces 2**38 float32 (1 TiB) but holds 12 bytes."""
    import zipfile

    path = tmp_path / "big.npz"
    np.savez(path, W1=np.ones(3, np.float32))
    with zipfile.ZipFile(path) as archive:
        member = archive.read("W1.npy")
    length = struct.unpack("<H", member[8:10])[0]  # .npy 1.0: magic, version, header length
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (274877906944,), }"
    forged = member[:10] + header.ljust(length - 1) + b"\n" + member[10 + length:]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("W1.npy", forged)
    with pytest.raises(ValueError, match=r"announces \(274877906944,\) of float32 \(1099511627776 bytes\)"):
        load_params(path)
    one_line_error(capsys, ["evaluate", "--weights", str(path)], "not a readable .npz")


# ------------------------------------------------------------------ pickles
class _Reduce:
    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize("value,message", [
    # 4 bytes made into a 784 x 3,000,000 float32 array by zero strides (9.4 GB on use)
    (_Reduce(np.ndarray, ((784, 3_000_000), np.dtype(np.float32), b"\0" * 4, 0, (0, 0))), "not callable"),
    (_Reduce(np.ndarray, ((10,), np.dtype(np.float32))), "not callable"),  # uninitialised
    (_Reduce(os.system, ("true",)), "refusing to load posix.system"),
    (_Reduce(np.frombuffer, (b"\0" * 8, np.float32)), "refusing to load numpy"),
    # an int64 dtype whose state flags it as holding object references (found by the fuzzer:
    # numpy then treats the array's raw bytes as pointers when it frees it)
    (_Reduce(np.dtype, ("i8", False, True), (3, "<", None, None, None, -1, -1, 63)), "state of a dtype"),
    (_Reduce(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
             (1, (2,), np.dtype("O"), False, [1, 2])), "state of a dtype"),
])
def test_hostile_pickles_are_refused(tmp_path, value, message):
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"W1": value}))
    with pytest.raises(UnsafePickleError, match=message):
        load_book_params(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_loads_arrays_of_their_own(tmp_path, protocol):
    arrays = {"W1": np.arange(12, dtype=np.float32).reshape(3, 4), "b1": np.ones(4),
              "F": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "i": np.arange(3)}
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=protocol))
    loaded = load_book_params(path)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype
        assert loaded[key].flags.c_contiguous and loaded[key].flags.owndata and loaded[key].flags.writeable


# ------------------------------------------------------------------ the command
@pytest.mark.parametrize("argv,message", [
    (["train", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["train", "--iters", "x"], "argument --iters: expected a whole number, got 'x'"),
    (["gradcheck", "--batches", "0"], "argument --batches: must be at least 1"),
    (["gradcheck", "--subset", "0"], "argument --subset: must be at least 1"),
    (["train", "--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
])
def test_bad_options_are_one_line_naming_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastnet: error:") and message in err, err


def test_sizes_beyond_the_data_or_the_memory(tmp_path, capsys, mnist_dir):
    data = ["--data-dir", str(mnist_dir.parent), "--no-plot", "--no-progress", "--out", str(tmp_path / "r")]
    one_line_error(capsys, ["train", "--batch-size", "1000000000", *data],
                   "batch_size must be from 1 to the 60000 training rows, got 1000000000")
    one_line_error(capsys, ["train", "--hidden", "1000000000", *data], "not enough memory", "TiB")


def test_out_that_cannot_be_a_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, ["train", "--out", str(afile)], f"--out {afile} is a file")
    one_line_error(capsys, ["train", "--out", str(afile / "sub")], f"--out {afile / 'sub'}: Not a directory")
    assert afile.read_text() == "x"


def test_full_disk_is_one_line(tmp_path, capsys, mnist_dir, monkeypatch):
    def full(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fio, "atomic_write", full)
    one_line_error(capsys, ["train", "--iters", "700", "--data-dir", str(mnist_dir.parent), "--no-plot",
                            "--no-progress", "--out", str(tmp_path / "r")],
                   "No space left on device", str(tmp_path / "r"))


def test_predict_refuses_a_decompression_bomb_unread(tmp_path, capsys, book_weights):
    pytest.importorskip("PIL")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    one_line_error(capsys, ["predict", "--weights", str(book_weights), str(bomb)], f"cannot read {bomb}")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4000, 4000, 8, 0, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    one_line_error(capsys, ["predict", "--weights", str(book_weights), str(big)], "is 4000x4000")


def test_cache_home_that_is_a_file_still_loads(tmp_path, capsys, mnist_dir, book_weights, monkeypatch):
    afile = tmp_path / "cache"
    afile.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(afile))
    assert main(["evaluate", "--weights", str(book_weights), "--data-dir", str(mnist_dir.parent)]) == 0
    assert "accuracy: 0.9352" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--lr", "1000"], "training accuracy"),
    (["--optimizer", "adam", "--lr", "1e6"], "chance level"),
])
def test_a_run_that_learns_nothing_fails_and_keeps_its_files(tmp_path, capsys, mnist_dir, argv, message):
    out = tmp_path / "r"
    err = one_line_error(capsys, ["train", "--iters", "1200", "--data-dir", str(mnist_dir.parent), "--no-plot",
                                  "--no-progress", "--out", str(out), *argv], message, "learned nothing",
                         str(out), code=1)
    assert err.startswith("fastnet: the run learned nothing")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "weights.npz"]


def test_a_diverged_run_fails_and_keeps_its_files(tmp_path, capsys, mnist_dir):
    out = tmp_path / "r"
    one_line_error(capsys, ["train", "--iters", "600", "--data-dir", str(mnist_dir.parent), "--no-plot",
                            "--no-progress", "--out", str(out), "--lr", "1e30"],
                   "the loss became nan at iteration 2", "diverged", str(out), code=1)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "weights.npz"]


def test_ctrl_c_before_training_is_one_line(tmp_path, mnist_dir):
    """SIGINT while the command loads its data: status 130, one line, no traceback.  The
    loading is held (it announces itself and waits) so that the signal lands there."""
    hold = ("import sys, time, fastnet.datasets.core as core\n"
            "core.locate = lambda *a, **k: (print('loading', flush=True), time.sleep(60))\n"
            "from fastnet.cli import run\n"
            "run()\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, "train", "--data-dir", str(mnist_dir.parent),
                             "--no-plot", "--out", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    assert proc.stdout.readline() == "loading\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "fastnet: interrupted\n", err


# ------------------------------------------------------------------ leftovers of killed writers
def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_parts_of_dead_writers_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    names = [f".weights.npz.{dead}.abc_12.part", f".metrics.json.{alive}.x9.part", "keep.part", ".x.part"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = fio.remove_stale_parts(tmp_path)
    assert [p.name for p in removed] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_checkpoint_is_one_unit(tmp_path, rng):
    """weights.npz carries its epoch's metrics; a kill between the two renames (metrics.json
    an epoch behind) and a dead writer's temporary file are mended by the next Trainer."""
    x = rng.random((200, 784)).astype(np.float32)
    t = rng.integers(0, 10, 200)
    net = MultiLayerNet(784, [5], 10, dtype=np.float32, seed=0)
    trainer = Trainer(net, x, t, iters=4, batch_size=100, checkpoint_dir=tmp_path, seed=0)
    trainer.fit()
    after_two = (tmp_path / "metrics.json").read_bytes()
    with np.load(tmp_path / "weights.npz") as data:
        assert data["__metrics__"].tobytes() == after_two
    stale = tmp_path / f".weights.npz.{_dead_pid()}.zz.part"
    stale.write_bytes(b"half a file")
    (tmp_path / "metrics.json").write_bytes(b'{"iterations": 2}')  # as if killed between the renames
    Trainer(MultiLayerNet(784, [5], 10, dtype=np.float32, seed=0), x, t, iters=1, checkpoint_dir=tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == after_two and not stale.exists()
    assert load_net(tmp_path / "weights.npz").sizes == [784, 5, 10]
    repair_checkpoint(tmp_path / "nothing-here")  # no checkpoint: nothing to do


def test_save_net_round_trip_keeps_working(tmp_path):
    net = MultiLayerNet(784, [7, 6], 10, activation="sigmoid", seed=1)
    save_net(tmp_path / "n.npz", net)
    back = load_net(tmp_path / "n.npz")
    assert back.sizes == net.sizes and back.activation == "sigmoid"
    for key in net.params:
        np.testing.assert_array_equal(back.params[key], net.params[key])
