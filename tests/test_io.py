"""Weights: .npz round trip, and the book's pickle through a loader that runs nothing."""

import pickle

import numpy as np
import pytest

from fastnet.io import UnsafePickleError, load_book_params, load_params, save_params


def test_npz_round_trip(tmp_path):
    params = {"W1": np.arange(6, dtype=np.float32).reshape(2, 3), "b1": np.zeros(3)}
    path = save_params(tmp_path / "w", params)
    assert path.name == "w.npz"
    loaded = load_params(path)
    assert loaded.keys() == params.keys()
    assert all(np.array_equal(loaded[k], params[k]) and loaded[k].dtype == params[k].dtype for k in params)
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_load_params_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_params(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_params(tmp_path / "bad.npz")


def test_book_pickle(book_weights):
    params = load_book_params(book_weights)
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {"W1": (784, 50), "b1": (50,), "W2": (50, 100), "b2": (100,), "W3": (100, 10), "b3": (10,)}
    assert all(v.dtype == np.float32 for v in params.values())


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/fastnet-pwned",))


def test_book_loader_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"W1": Evil()}))
    with pytest.raises(UnsafePickleError, match="refusing to load posix.system|refusing to load os.system"):
        load_book_params(path)
    import os

    assert not os.path.exists("/tmp/fastnet-pwned")


def test_book_loader_refuses_non_dicts_and_objects(tmp_path):
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([np.zeros(2)]))
    with pytest.raises(UnsafePickleError, match="holds a list"):
        load_book_params(tmp_path / "list.pkl")
    (tmp_path / "str.pkl").write_bytes(pickle.dumps({"W1": "text"}))
    with pytest.raises(UnsafePickleError, match="'W1' is str"):
        load_book_params(tmp_path / "str.pkl")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps({"W1": np.zeros(3)})[:-5])
    with pytest.raises(UnsafePickleError, match="not a readable weights pickle"):
        load_book_params(tmp_path / "trunc.pkl")
