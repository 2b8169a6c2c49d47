"""load_mnist / load_fashion_mnist: real files, generated IDX files, downloads over HTTP."""

import gzip
import hashlib
import http.server
import os
import stat
import threading
import time
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fastnet.datasets import (
    FASHION_MNIST,
    FILES,
    MNIST,
    Dataset,
    DatasetError,
    cache_dir,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    parse_idx,
)
from fastnet.datasets.core import _parsed_cache, payload_size
from fastnet.datasets.fetch import download
from fastnet.datasets.idx import read_payload

# label histograms of the real MNIST files
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _listing(folder: Path):
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def test_real_mnist(mnist_dir):
    before = _listing(mnist_dir)
    (x_train, t_train), (x_test, t_test) = load_mnist(data_dir=mnist_dir.parent, download=False)
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() == 1.0
    assert t_train.dtype == np.uint8
    assert np.bincount(t_train).tolist() == TRAIN_COUNTS
    assert np.bincount(t_test).tolist() == TEST_COUNTS
    assert t_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert _listing(mnist_dir) == before  # nothing written beside the read-only data


def test_real_mnist_book_options(mnist_dir):
    (x, t), (xt, tt) = load_mnist(normalize=False, flatten=False, one_hot_label=True,
                                  data_dir=mnist_dir, download=False, dtype=np.float64)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == np.uint8 and x.max() == 255
    assert t.shape == (60000, 10) and t.dtype == np.float64
    assert t.sum(axis=1).tolist() == [1.0] * 60000
    assert np.argmax(t[:3], axis=1).tolist() == [5, 0, 4]
    # the parsed cache serves the second load and gives the same arrays
    assert list((cache_dir() / "parsed").glob("*train-images*.npy"))
    (x2, _), _ = load_mnist(normalize=False, flatten=False, data_dir=mnist_dir, download=False)
    assert np.array_equal(x, x2)


def test_fashion_mnist_from_debian():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / FILES["train_img"]).exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    (x, t), (xt, tt) = load_fashion_mnist(download=False)
    assert x.shape == (60000, 784) and xt.shape == (10000, 784)
    assert np.bincount(t).tolist() == [6000] * 10
    assert np.bincount(tt).tolist() == [1000] * 10


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_mnist(data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "mnist") in message and str(cache_dir() / "mnist") in message
    assert "download=False" in message and "FASTNET_DATA" in message


# ------------------------------------------------------------------ generated files
def idx_bytes(array: np.ndarray) -> bytes:
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_files(seed=0, n_train=6, n_test=4):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_img": rng.integers(0, 256, (n_train, 28, 28)),
        "train_label": rng.integers(0, 10, n_train),
        "test_img": rng.integers(0, 256, (n_test, 28, 28)),
        "test_label": rng.integers(0, 10, n_test),
    }
    payloads = {key: idx_bytes(a) for key, a in arrays.items()}
    return arrays, payloads


def tiny_spec(payloads, mirrors=()):
    return Dataset(
        name="Tiny",
        folder="tiny",
        mirrors=tuple(mirrors),
        sha256={k: hashlib.sha256(p).hexdigest() for k, p in payloads.items()},
        counts={"train": 6, "test": 4},
    )


def write_files(folder: Path, payloads, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    for key, payload in payloads.items():
        (folder / FILES[key]).write_bytes(gzip.compress(payload) if compress else payload)


def test_generated_files_load(tmp_path):
    arrays, payloads = tiny_files()
    write_files(tmp_path / "tiny", payloads)
    (x, t), (xt, tt) = load_dataset(tiny_spec(payloads), data_dir=tmp_path, download=False)
    assert np.allclose(x, arrays["train_img"].reshape(6, 784) / 255.0)
    assert t.tolist() == arrays["train_label"].tolist()


def test_recompressed_file_verifies_by_payload(tmp_path):
    _, payloads = tiny_files()
    write_files(tmp_path, payloads)
    (tmp_path / FILES["test_img"]).write_bytes(gzip.compress(payloads["test_img"], compresslevel=1))
    load_dataset(tiny_spec(payloads), data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda p: b"\x00\x00\x08\x01" + p[4:], "bad IDX magic number 0x00000801"),
        (lambda p: p[:4] + (7).to_bytes(4, "big") + p[8:], "header says 7 items, expected 6"),
        (lambda p: p[:-10], "truncated"),
        (lambda p: p[:-1] + bytes([p[-1] ^ 1]), "sha256"),
    ],
)
def test_corrupt_file_is_refused_not_replaced(tmp_path, damage, expected):
    _, payloads = tiny_files()
    write_files(tmp_path, payloads)
    bad = tmp_path / FILES["train_img"]
    bad.write_bytes(gzip.compress(damage(payloads["train_img"])))
    before = bad.read_bytes()
    with pytest.raises(DatasetError, match=expected) as info:
        load_dataset(tiny_spec(payloads, ["http://127.0.0.1:9/"]), data_dir=tmp_path, cache=False)
    assert str(bad) in str(info.value)
    assert bad.read_bytes() == before


def test_truncated_gzip(tmp_path):
    _, payloads = tiny_files()
    write_files(tmp_path, payloads)
    path = tmp_path / FILES["train_label"]
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DatasetError, match="not a valid gzip file"):
        load_dataset(tiny_spec(payloads), data_dir=tmp_path, download=False)


def test_parse_idx_short_header():
    with pytest.raises(DatasetError, match="too short"):
        parse_idx(b"\x00\x00", 3, "x")


def test_bad_label_values(tmp_path):
    arrays, payloads = tiny_files()
    labels = arrays["train_label"].copy()
    labels[0] = 12
    payloads["train_label"] = idx_bytes(labels)
    write_files(tmp_path, payloads)
    with pytest.raises(DatasetError, match="label 12 is out of range"):
        load_dataset(tiny_spec(payloads), data_dir=tmp_path, download=False)


# ------------------------------------------------------------------ downloads over HTTP
class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        mode, _, name = self.path.strip("/").partition("/")
        body = self.files.get(name)
        if mode == "missing" or body is None:
            self.send_error(404)
            return
        if mode == "bad":  # a well-formed IDX file with one pixel changed
            payload = bytearray(gzip.decompress(body))
            payload[-1] ^= 1
            body = gzip.compress(bytes(payload))
        self.send_response(200)
        if mode == "huge":  # announces a terabyte
            self.send_header("Content-Length", str(10**12))
        elif mode not in ("endless", "drip"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "endless":  # no length, and more bytes than any data file (bounded here)
            try:
                for _ in range(4096):
                    self.wfile.write(bytes(1 << 16))
            except OSError:  # the client gave up: what the test wants
                pass
            return
        if mode == "drip":  # a byte every 50 ms for 20 s: never silent long enough to time out
            try:
                for _ in range(400):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
            return
        if mode == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-transfer
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    _, payloads = tiny_files(seed=1)
    handler = type("H", (_Handler,), {"files": {FILES[k]: gzip.compress(p) for k, p in payloads.items()},
                                      "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, payloads, handler
    httpd.shutdown()
    httpd.server_close()


def _cache_files():
    folder = cache_dir() / "tiny"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(autouse=True)
def clean_tiny_cache():
    import shutil

    shutil.rmtree(cache_dir() / "tiny", ignore_errors=True)
    yield
    shutil.rmtree(cache_dir() / "tiny", ignore_errors=True)


def test_download_success_with_progress(server, capsys):
    base, payloads, handler = server
    (x, t), _ = load_dataset(tiny_spec(payloads, [base + "/good/"]))
    assert x.shape == (6, 784)
    assert _cache_files() == sorted(FILES.values())
    err = capsys.readouterr().err
    assert "downloading train-images-idx3-ubyte.gz" in err and "100.0%" in err
    handler.requests.clear()
    load_dataset(tiny_spec(payloads, [base + "/good/"]))  # second time: from the cache
    assert handler.requests == []


def test_mirror_fallback_after_404_and_dropped_connection(server):
    base, payloads, handler = server
    spec = tiny_spec(payloads, [base + "/missing/", base + "/drop/", base + "/good/"])
    (x, t), _ = load_dataset(spec, progress=False)
    assert t.shape == (6,)
    assert handler.requests[:3] == [f"/{m}/{FILES['train_img']}" for m in ("missing", "drop", "good")]
    assert _cache_files() == sorted(FILES.values())  # no partial files left


def test_checksum_mismatch_rejected(server):
    base, payloads, _ = server
    with pytest.raises(DatasetError, match="bad/train-images.*sha256 [0-9a-f]{64}, expected") as info:
        load_dataset(tiny_spec(payloads, [base + "/bad/"]), progress=False)
    assert "With no network" in str(info.value)
    assert _cache_files() == []


def test_interrupted_transfer_leaves_nothing(server):
    base, payloads, _ = server
    with pytest.raises(DatasetError, match="drop/train-images"):
        load_dataset(tiny_spec(payloads, [base + "/drop/"]), progress=False)
    assert _cache_files() == []


def test_no_network_names_paths_and_fix(tmp_path):
    _, payloads = tiny_files()
    with pytest.raises(DatasetError) as info:
        load_dataset(tiny_spec(payloads, ["http://127.0.0.1:9/"]), data_dir=tmp_path, progress=False)
    message = str(info.value)
    assert str(tmp_path) in message and "127.0.0.1:9" in message and "FASTNET_DATA" in message


def test_read_only_data_dir_is_not_written(server, tmp_path):
    base, payloads, _ = server
    data = tmp_path / "readonly"
    write_files(data / "tiny", {k: payloads[k] for k in ("train_img", "train_label")})
    before = _listing(data / "tiny")
    os.chmod(data / "tiny", stat.S_IRUSR | stat.S_IXUSR)
    try:
        load_dataset(tiny_spec(payloads, [base + "/good/"]), data_dir=data, progress=False)
    finally:
        os.chmod(data / "tiny", stat.S_IRWXU)
    assert _listing(data / "tiny") == before
    assert _cache_files() == sorted([FILES["test_img"], FILES["test_label"]])


def test_fashion_spec_lists_debian_path():
    assert "/usr/share/datasets/fashion-mnist" in FASHION_MNIST.system_dirs
    assert MNIST.mirrors[0].startswith("http://yann.lecun.com")
    assert replace(MNIST, folder="x").folder == "x"


def test_cached_parse_is_mapped_copy_on_write(tmp_path):
    """The second load maps the cached parse: the same values in a writable array whose
    writes stay in the process (the next load sees the file unchanged); a cache file cut
    short is noticed and written again."""
    arrays, payloads = tiny_files(seed=3)
    write_files(tmp_path / "tiny", payloads)
    spec = tiny_spec(payloads)
    images = arrays["train_img"].reshape(6, 784)
    (x1, t1), _ = load_dataset(spec, normalize=False, data_dir=tmp_path, download=False)  # parsed
    (x, t), _ = load_dataset(spec, normalize=False, data_dir=tmp_path, download=False)  # mapped
    assert type(x) is np.ndarray and x.flags.writeable and x.dtype == np.uint8
    assert np.array_equal(x, images) and np.array_equal(x1, images) and np.array_equal(t, t1)
    x[:] = 7
    (x2, _), _ = load_dataset(spec, normalize=False, data_dir=tmp_path, download=False)
    assert np.array_equal(x2, images)
    del x, x2
    npy, _ = _parsed_cache(tmp_path / "tiny" / FILES["train_img"])
    whole = npy.stat().st_size
    npy.write_bytes(npy.read_bytes()[:-100])
    (x3, _), _ = load_dataset(spec, normalize=False, data_dir=tmp_path, download=False)
    assert np.array_equal(x3, images) and npy.stat().st_size == whole


def _gzip_bomb(path: Path, size: int) -> None:
    """A gzip file of ``size`` zero bytes, written in pieces (it is about size / 1000)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as fh:
        for _ in range(size >> 24):
            fh.write(packer.compress(bytes(1 << 24)))
        fh.write(packer.flush())


@pytest.mark.parametrize("compressed", [True, False])
def test_oversized_file_is_refused_within_its_payload(tmp_path, compressed):
    """A 400 MB payload in a file named for 6 labels (a 0.4 MB gzip bomb, or a plain
    400 MB file) is refused after reading one byte more than 6 labels take, without
    holding the rest in memory."""
    _, payloads = tiny_files()
    write_files(tmp_path, payloads)
    path = tmp_path / FILES["train_label"]
    if compressed:
        _gzip_bomb(path, 400 << 20)
    else:
        with open(path, "wb") as fh:
            fh.truncate(400 << 20)
    spec = tiny_spec(payloads)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=rf"longer than the {payload_size(spec, 'train_label')} bytes"):
            load_dataset(spec, data_dir=tmp_path, download=False, cache=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes"


def test_read_payload_limit_is_exact(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(b"x" * 100))
    assert read_payload(path, 100) == b"x" * 100
    with pytest.raises(DatasetError, match="longer than the 99 bytes"):
        read_payload(path, 99)


def test_parse_idx_header_of_huge_dimensions_is_refused():
    """Dimensions whose product overflows int64 are measured exactly, not wrapped."""
    header = (0x0803).to_bytes(4, "big") + b"".join((2**32 - 1).to_bytes(4, "big") for _ in range(3))
    with pytest.raises(DatasetError, match="truncated"):
        parse_idx(header + bytes(10), 3, "x")


@pytest.mark.parametrize("mode,why", [
    ("endless", "sent more than"),
    ("huge", "announces 1000000000000 bytes"),
])
def test_download_over_the_size_cap_is_abandoned(server, mode, why):
    base, payloads, _ = server
    with pytest.raises(DatasetError, match=f"{mode}/train-images.*{why}"):
        load_dataset(tiny_spec(payloads, [base + f"/{mode}/"]), progress=False)
    assert _cache_files() == []


def test_download_deadline(server, tmp_path):
    """A server that trickles bytes (never silent long enough for the socket timeout)
    is abandoned at the deadline, and the next mirror is tried."""
    base, payloads, _ = server
    name = FILES["train_label"]
    with pytest.raises(DatasetError, match=r"drip/train-labels.*not finished after 1 s"):
        download([f"{base}/drip/{name}"], tmp_path / name, lambda p: None, deadline=1.0, progress=False)
    assert list(tmp_path.iterdir()) == []
    got = download([f"{base}/drip/{name}", f"{base}/good/{name}"], tmp_path / name, lambda p: None,
                   deadline=1.0, progress=False)
    assert gzip.decompress(got.read_bytes()) == payloads["train_label"]
