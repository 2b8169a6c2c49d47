"""Trainer: the fused step equals the book's loop, seeds repeat, Ctrl-C keeps the work."""

import json
import threading

import numpy as np
import pytest

import fastnet
from fastnet.datasets import load_mnist
from fastnet.nets import MultiLayerNet, TwoLayerNet
from fastnet.train import Trainer, TrainingInterrupted, load_net


def _data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.random((10, 64))
    t = rng.integers(0, 10, n)
    x = np.clip(centers[t] + 0.3 * rng.standard_normal((n, 64)), 0, 1)
    return (x * 255).astype(np.uint8), t


def _sparse_data(n=600, seed=0):
    """Like _data, with about 80% of the pixels zero (as MNIST's 81%)."""
    x, t = _data(n, seed)
    x[np.random.default_rng(seed + 1).random(x.shape) < 0.8] = 0
    return x, t


def _fit(backend_name, fused, dtype=np.float64, optimizer="sgd", iters=120, pixels=True, lr=0.1,
         sparse="auto", data=_data):
    x, t = data()
    if not pixels:
        x = x.astype(dtype) / dtype(255)
    with fastnet.use_backend(backend_name):
        net = TwoLayerNet(64, 20, 10, seed=1, dtype=dtype)
        trainer = Trainer(net, x, t, x[:100], t[:100], iters=iters, batch_size=50, seed=2,
                          fused=fused, optimizer=optimizer, lr=lr, sparse=sparse)
        history = trainer.fit()
    assert history.config["sparse"] == trainer.use_sparse()
    return net, history


@pytest.mark.parametrize("backend_name", ["numpy", "numba", "cython"])
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("momentum", 0.05), ("adam", 0.01)])
def test_fused_step_equals_book_loop(backend_name, optimizer, lr):
    fused_net, fused_h = _fit(backend_name, True, optimizer=optimizer, lr=lr)
    loop_net, loop_h = _fit(backend_name, False, optimizer=optimizer, lr=lr)
    np.testing.assert_allclose(fused_h.loss, loop_h.loss, rtol=1e-9)
    for key in fused_net.params:
        np.testing.assert_allclose(fused_net.params[key], loop_net.params[key], rtol=1e-8, atol=1e-12)
    assert fused_h.train_acc == loop_h.train_acc


@pytest.mark.parametrize("backend_name", ["numpy", "numba", "cython"])
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.01)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_step_equals_book_loop(backend_name, optimizer, lr, dtype):
    """Inputs read as CSR rows: the same training as the book's loop, up to rounding order."""
    sparse_net, sparse_h = _fit(backend_name, True, dtype, optimizer, lr=lr, sparse=True, data=_sparse_data)
    loop_net, loop_h = _fit(backend_name, False, dtype, optimizer, lr=lr, sparse=False, data=_sparse_data)
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(sparse_h.loss, loop_h.loss, rtol=rtol)
    for key in sparse_net.params:
        np.testing.assert_allclose(sparse_net.params[key], loop_net.params[key], rtol=rtol * 10,
                                   atol=1e-5 if dtype == np.float32 else 1e-12)
    assert np.abs(np.subtract(sparse_h.train_acc, loop_h.train_acc)).max() <= 2 / 600


def test_sparse_auto_choice():
    """'auto' reads sparse inputs as CSR on the compiled backends only; dense data stays dense."""
    x, t = _sparse_data()
    for name, expected in (("numpy", False), ("numba", True), ("cython", True)):
        with fastnet.use_backend(name):
            trainer = Trainer(TwoLayerNet(64, 20, 10, seed=1), x, t, iters=1)
            assert trainer.density() < 0.3
            assert trainer.use_sparse() is expected
    with fastnet.use_backend("cython"):
        dense_x, dense_t = _data()
        assert not Trainer(TwoLayerNet(64, 20, 10, seed=1), dense_x, dense_t, iters=1).use_sparse()
        assert not Trainer(TwoLayerNet(64, 20, 10, seed=1), x, t, iters=1, sparse=False).use_sparse()
        deep = MultiLayerNet(64, [20, 20], 10, seed=1)
        assert Trainer(deep, x, t, iters=1).use_sparse()  # any depth
        assert not Trainer(deep, x, t, iters=1, fused=False).use_sparse()
        with pytest.raises(ValueError, match="fused"):
            Trainer(deep, x, t, iters=1, sparse=True, fused=False)
        with pytest.raises(ValueError, match="sparse"):
            Trainer(TwoLayerNet(64, 20, 10, seed=1), x, t, iters=1, sparse="yes")


def test_sparse_accuracy_equals_dense():
    x, t = _sparse_data(3000)
    with fastnet.use_backend("cython"):
        net = TwoLayerNet(64, 20, 10, seed=1, weight_init_std=0.3)
        sparse = Trainer(net, x, t, iters=1, sparse=True).accuracy(x, t)
        dense = Trainer(net, x, t, iters=1, sparse=False).accuracy(x, t)
    expected = float(np.mean(np.argmax(net.predict(x / 255.0), axis=1) == t))
    assert abs(sparse - dense) <= 2 / 3000 and abs(dense - expected) <= 2 / 3000
    # float64 test rows for a float32 net: stored in the net's dtype, not refused
    with fastnet.use_backend("cython"):
        net32 = TwoLayerNet(64, 20, 10, seed=1, weight_init_std=0.3, dtype=np.float32)
        trainer = Trainer(net32, x, t, x / 255.0, t, iters=2, sparse=True)
        history = trainer.fit()
    assert abs(history.test_acc[-1] - trainer.accuracy(x.astype(np.float32) / np.float32(255), t)) <= 2 / 3000
    assert trainer.accuracy(x / 255.0, t) == trainer.accuracy(x.astype(np.float32) / np.float32(255), t)


def test_same_seed_same_result_and_float_input():
    a_net, a = _fit("cython", "auto", dtype=np.float32)
    b_net, b = _fit("cython", "auto", dtype=np.float32)
    assert a.loss == b.loss and a.test_acc == b.test_acc
    assert all(np.array_equal(a_net.params[k], b_net.params[k]) for k in a_net.params)
    c_net, c = _fit("cython", "auto", dtype=np.float32, pixels=False)
    assert c.loss == a.loss  # uint8 pixels are normalised exactly as floats / 255


def test_history_epochs_and_learning():
    net, h = _fit("cython", "auto", iters=30, lr=1.0)
    # 600 rows / batch 50 = 12 iterations an epoch: epochs end at 12, 24 and the last at 30
    assert h.epoch_iter == [12, 24, 30]
    assert len(h.loss) == 30 and len(h.train_acc) == len(h.test_acc) == 3
    assert h.train_acc[-1] > 0.25 and h.loss[-1] < h.loss[0]  # chance is 0.1


@pytest.mark.parametrize("backend_name", ["numpy", "numba", "cython"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adagrad", "adam"])
def test_deeper_net_takes_the_engine(backend_name, optimizer):
    """A net of any depth trains through the MLP engine (many steps a call, the optimiser
    inside): the weights the book's loop (net.gradient + optimizer.update on the
    reference backend, float64) gives, within rounding, and the optimiser object holds
    the state the engine left (a second fit goes on from it)."""
    x, t = _data()
    lr = {"sgd": 0.1, "momentum": 0.05, "adagrad": 0.05, "adam": 0.005}[optimizer]
    nets, opts = [], []
    for name, fused in ((backend_name, "auto"), ("numpy", False)):
        with fastnet.use_backend(name):
            net = MultiLayerNet(64, [16, 12], 10, seed=0, weight_decay_lambda=0.01)
            trainer = Trainer(net, x, t, epochs=2, batch_size=50, seed=0, optimizer=optimizer, lr=lr, fused=fused)
            assert trainer.fused is (fused == "auto")
            assert trainer.fit().iterations == 24
            trainer.iters = 36
            assert trainer.fit().iterations == 36
        nets.append(net)
        opts.append(trainer.optimizer)
    for key in nets[1].params:
        np.testing.assert_allclose(nets[0].params[key], nets[1].params[key], rtol=1e-7, atol=1e-9, err_msg=key)
    for name in opts[1].state_names:
        for key, value in getattr(opts[1], name).items():
            np.testing.assert_allclose(getattr(opts[0], name)[key], value, rtol=1e-7, atol=1e-9)
    assert getattr(opts[0], "iter", 0) == getattr(opts[1], "iter", 0)
    with pytest.raises(ValueError, match="backprop"):
        Trainer(net, x, t, iters=1, fused=True, gradient="numerical")


def test_an_optimiser_of_the_users_gets_the_engines_gradients():
    """Any object with update(params, grads) trains through mlp_gradient, one step a call."""
    x, t = _data()

    class HalfSGD:
        lr = 0.2

        def update(self, params, grads):
            for key in params:
                params[key] -= 0.5 * self.lr * grads[key]

    nets = []
    for optimizer in (HalfSGD(), "sgd"):
        net = MultiLayerNet(64, [16, 12], 10, seed=0)
        Trainer(net, x, t, iters=5, batch_size=50, seed=0, optimizer=optimizer, lr=0.1).fit()
        nets.append(net)
    for key in nets[0].params:
        np.testing.assert_allclose(nets[0].params[key], nets[1].params[key], rtol=1e-12, atol=1e-15)


def test_callbacks_and_checkpoints(tmp_path):
    x, t = _data()
    seen = []

    def stop_after_two(trainer, record):
        seen.append(record["epoch"])
        return record["epoch"] < 2

    net = TwoLayerNet(64, 10, 10, seed=0)
    h = Trainer(net, x, t, x, t, epochs=5, batch_size=50, callbacks=[stop_after_two],
                checkpoint_dir=tmp_path).fit()
    assert seen == [1, 2] and h.iterations == 24
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["iterations"] == 24 and len(saved["test_acc"]) == 2
    again = load_net(tmp_path / "weights.npz")
    assert again.sizes == [64, 10, 10]
    assert all(np.array_equal(again.params[k], net.params[k]) for k in net.params)


def test_epoch_checkpoints_do_not_hold_the_training(tmp_path, monkeypatch):
    """Epoch checkpoints are written by a thread: a disk that holds the first checkpoint
    until the last epoch has ended does not hold the epochs, a newer checkpoint replaces
    one still waiting, and fit() returns with the last epoch's files on disk."""
    import fastnet.train as train_module

    written = []
    real = train_module._write_checkpoint
    last_epoch = threading.Event()

    def stuck_disk(folder, arrays, metrics):
        last_epoch.wait(60)  # (a loop that waited for the disk would find this out in a minute)
        written.append(json.loads(metrics)["iterations"])
        return real(folder, arrays, metrics)

    def epoch_end(trainer, record):
        seen.append(len(written))
        if len(seen) == 6:
            last_epoch.set()

    monkeypatch.setattr(train_module, "_write_checkpoint", stuck_disk)
    x, t = _data()
    net = TwoLayerNet(64, 10, 10, seed=0)
    seen = []
    trainer = Trainer(net, x, t, x, t, epochs=6, batch_size=50, checkpoint_dir=tmp_path, callbacks=[epoch_end])
    h = trainer.fit()
    assert seen == [0] * 6  # every epoch ended while the first checkpoint was still held
    # the newest last; those queued behind the held one were replaced (which epoch the
    # thread took first depends on when it started)
    assert written[-1] == 72 and len(written) <= 2
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["iterations"] == 72 == h.iterations and len(saved["train_acc"]) == 6
    assert all(np.array_equal(load_net(tmp_path / "weights.npz").params[k], net.params[k]) for k in net.params)
    for thread in threading.enumerate():  # the writer's thread ends with fit()
        if thread.name.startswith("fastnet-checkpoints"):
            thread.join(2)
            assert not thread.is_alive()


def test_checkpoint_error_is_raised_by_fit(tmp_path):
    """A checkpoint that cannot be written (the folder is a file) fails fit() with the
    writer's error, not silently."""
    x, t = _data()
    (tmp_path / "taken").write_text("a file where the folder should be")
    trainer = Trainer(TwoLayerNet(64, 10, 10, seed=0), x, t, epochs=3, batch_size=50,
                      checkpoint_dir=tmp_path / "taken")
    with pytest.raises(OSError, match="File exists|Not a directory"):
        trainer.fit()


def test_ctrl_c_keeps_weights_and_history(tmp_path):
    x, t = _data()

    class Interrupt:
        calls = 0

        def update(self, params, grads):
            Interrupt.calls += 1
            if Interrupt.calls == 30:
                raise KeyboardInterrupt
            for k in grads:
                params[k] -= 0.1 * grads[k]

    net = TwoLayerNet(64, 10, 10, seed=0)
    trainer = Trainer(net, x, t, iters=100, batch_size=50, optimizer=Interrupt(), checkpoint_dir=tmp_path)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.saved == tmp_path
    assert info.value.history.interrupted and info.value.history.iterations == 29
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["interrupted"] is True and len(saved["loss"]) == 29
    assert np.array_equal(load_net(tmp_path / "weights.npz").params["W1"], net.params["W1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "weights.npz"]


def test_bad_input():
    x, t = _data()
    net = TwoLayerNet(64, 10, 10, seed=0)
    with pytest.raises(ValueError, match="exactly one of iters or epochs"):
        Trainer(net, x, t)
    with pytest.raises(ValueError, match="65 features per row"):
        Trainer(net, np.zeros((10, 65)), t[:10], iters=1)
    with pytest.raises(ValueError, match="outside"):
        Trainer(net, x, t + 5, iters=1)
    bad = x.astype(np.float64)
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"x_train contains nan at index \(3, 4\)"):
        Trainer(net, bad, t, iters=1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        Trainer(net, x, t, iters=1, optimizer="rmsprop")


def test_divergence_is_reported():
    x, t = _data()
    net = TwoLayerNet(64, 10, 10, seed=0, weight_init_std=1e30)
    with pytest.raises(FloatingPointError, match="diverged"):
        Trainer(net, x.astype(np.float64) * 1e300, t, iters=5).fit()


@pytest.mark.parametrize("fused, optimizer", [(True, "sgd"), (True, "adam"), (False, "sgd")])
def test_divergence_keeps_a_consistent_history(fused, optimizer):
    """Whether the steps run one per call or many per call, the history holds the finite
    losses only, one per iteration counted, and the error names the failing iteration."""
    x, t = _data()
    net = TwoLayerNet(64, 10, 10, seed=0, dtype=np.float64)
    trainer = Trainer(net, x.astype(np.float64), t, iters=50, fused=fused, optimizer=optimizer, lr=1e300)
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="diverged") as err:
        trainer.fit()
    h = trainer.history
    assert len(h.loss) == h.iterations < 50 and all(np.isfinite(h.loss))
    assert f"iteration {h.iterations + 1}:" in str(err.value)


def test_chapter5_mnist_accuracy(mnist_dir):
    """The book's chapter-5 run, shortened to 3 epochs: test accuracy already past 0.93."""
    (x, t), (xt, tt) = load_mnist(normalize=False, data_dir=mnist_dir.parent, download=False)
    net = TwoLayerNet(784, 50, 10, seed=0, dtype=np.float32)
    h = Trainer(net, x, t, xt, tt, epochs=3, seed=0).fit()
    assert h.test_acc[-1] > 0.93
    assert h.train_acc == sorted(h.train_acc)


def test_metrics_json_is_one_line_per_field_with_float_losses():
    """History.dumps: the fields of metrics.json one per line, the losses as floats
    whatever their type (NumPy scalars included); a snapshot does not change with the
    history it was taken from."""
    from fastnet.train import History

    h = History(loss=[2.5, np.float32(0.3), np.float64(1e-300), 7], train_acc=[0.5], config={"lr": 0.1})
    text = h.dumps()
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and len(lines) == 2 + len(json.loads(text))
    assert f' "loss": {json.dumps([2.5, float(np.float32(0.3)), 1e-300, 7.0])},' in lines
    assert json.loads(text)["config"] == {"lr": 0.1}
    cache = {}  # encoding only the losses added since the last call gives the same text
    assert h.dumps(cache) == text
    h.loss.extend([np.float32(0.25), 3.0])
    assert h.dumps(cache) == h.dumps() and json.loads(h.dumps(cache))["loss"][-2:] == [0.25, 3.0]
    h.loss[0] = 9.0  # any other change: encoded whole again
    assert h.dumps(cache) == h.dumps()
    h.loss.clear()
    assert h.dumps(cache) == h.dumps() and json.loads(h.dumps(cache))["loss"] == []
    h.loss[:] = [2.5, np.float32(0.3), np.float64(1e-300), 7]
    copy = h.snapshot()
    h.loss.append(1.0)
    h.train_acc.append(0.9)
    h.config["lr"] = 0.2
    assert copy.loss == [2.5, np.float32(0.3), 1e-300, 7] and copy.train_acc == [0.5] and copy.config == {"lr": 0.1}


def test_weight_decay_trains_on_the_engine(rng):
    """A net with weight decay trains through the engine: the weights of gradient +
    update by hand (the book's loop), and each recorded loss includes
    0.5 * lambda * sum(W**2), as the book's network.loss does."""
    x, t = _data()
    net = MultiLayerNet(64, [10], 10, weight_decay_lambda=0.01, seed=0)
    copy = MultiLayerNet(64, [10], 10, weight_decay_lambda=0.01, seed=0)
    trainer = Trainer(net, x, t, iters=3, batch_size=20, seed=5, lr=0.1)
    assert trainer.fused
    h = trainer.fit()
    batches, xf = np.random.default_rng(5), x / 255.0  # the Trainer's pixels as floats
    for loss in h.loss:
        idx = batches.integers(0, len(x), 20)
        assert loss == pytest.approx(copy.loss(xf[idx], t[idx]), rel=1e-12)
        grads = copy.gradient(xf[idx], t[idx])
        for key in copy.params:
            copy.params[key] -= 0.1 * grads[key]
    for key in net.params:
        np.testing.assert_allclose(net.params[key], copy.params[key], rtol=1e-12, atol=1e-15)
    assert h.config["weight_decay"] == 0.01
