"""harness.data: dataset files checked on load, downloads verified (from a mirror on 127.0.0.1:
these machines are offline), and a first run that downloads its data before training."""
import os

import numpy as np
import pytest

from harness import data
from harness.testing import write_npz

pytest_plugins = ["harness.testing"]


@pytest.mark.parametrize("over,message", [
    (dict(y_train=np.array([0, 1, 2, 10], np.uint8)), "labels span 0..10"),
    (dict(x_train=np.zeros((4, 28, 28, 3), np.uint8)), "expected uint8(N, 28, 28, 1)"),
    (dict(x_test=np.zeros((2, 28, 28, 1), np.float64)), "images are float64"),
    (dict(y_test=np.arange(3)), "expected integer (2,)"),
    (dict(y_train=np.array([0, -1, 2, 3])), "labels span -1..3, expected 0..9")])
def test_bad_dataset_files_are_refused(tmp_path, over, message):
    write_npz(tmp_path / "mnist.npz", **over)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_dataset("mnist", str(tmp_path))


def test_missing_array_or_empty_test_split_is_one_line(tmp_path, capsys):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((4, 28, 28, 1), np.uint8), y_train=np.arange(4, dtype=np.uint8),
             x_test=np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="mnist.npz: missing array y_test; expected x_train"):
        data.load_dataset("mnist", str(tmp_path))
    write_npz(tmp_path / "mnist.npz", x_test=np.zeros((0, 28, 28, 1), np.uint8), y_test=np.zeros(0, np.uint8))
    import train_dt
    with pytest.raises(SystemExit, match="mnist has no test images in .+: nothing to evaluate on"):
        train_dt.main(["--data-dir", str(tmp_path), "--batch-size", "2", "--quiet"])


def test_good_npz_loads_and_corrupt_or_unknown_is_refused(tmp_path):
    write_npz(tmp_path / "mnist.npz")
    x, y, _, _ = data.load_dataset("mnist", str(tmp_path))
    assert x.dtype == np.float32 and x.shape == (4, 28, 28, 1) and list(y) == [0, 1, 2, 3]
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load_dataset("mnist", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load_dataset("imagenet", str(tmp_path))


def test_tfds_branch_offline_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        x, y, x_te, y_te = data.load_dataset("mnist", str(tmp_path), offline=True, use_tfds=True)
    assert x.shape == (6, 28, 28, 1) and 0 <= x.min() and x.max() <= 1 and y.max() < 10


def canonical_files(name, rng):
    """Small files in each dataset's canonical format, and the arrays they hold."""
    import gzip, io, tarfile
    n = {"train": 5, "test": 3}
    shape, m = data.DATASETS[name]
    arrays = {f"{a}_{s}": (rng.integers(0, 256, (n[s],) + shape) if a == "x" else rng.integers(0, m, n[s])).astype(np.uint8)
              for s in n for a in "xy"}
    if name == "mnist":  # Keras's mnist.npz: (N, 28, 28) images
        buf = io.BytesIO()
        np.savez(buf, **{k: v[..., 0] if k[0] == "x" else v for k, v in arrays.items()})
        return {"mnist.npz": buf.getvalue()}, arrays
    if name == "fashion_mnist":  # idx: magic (0, 0, 8, rank), big-endian dims, bytes
        def idx(a):
            return gzip.compress(bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.tobytes())
        return {f"{p}-{kind}-idx{r}-ubyte.gz": idx(arrays[f"{a}_{s}"][..., 0] if a == "x" else arrays[f"{a}_{s}"])
                for s, p in (("train", "train"), ("test", "t10k")) for a, kind, r in (("x", "images", 3), ("y", "labels", 1))}, arrays
    fine = name == "cifar100"  # binary records: [coarse label,] label, 3072 bytes channel-first

    def records(s, sl=slice(None)):
        x, y = arrays[f"x_{s}"][sl], arrays[f"y_{s}"][sl]
        labels = np.stack([y // 5, y], 1) if fine else y[:, None]
        return np.concatenate([labels, x.transpose(0, 3, 1, 2).reshape(len(x), -1)], 1).astype(np.uint8).tobytes()

    members = {"train.bin": records("train"), "test.bin": records("test")} if fine else \
        {**{f"data_batch_{i + 1}.bin": records("train", slice(i, i + 1)) for i in range(5)}, "test_batch.bin": records("test")}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, blob in members.items():
            info = tarfile.TarInfo(f"cifar-binary/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return {next(iter(data.SOURCES[name][1])): buf.getvalue()}, arrays


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A threaded HTTP server on 127.0.0.1 (a free port) serving tmp_path/www; NOPROP_DATA_URL points at it."""
    import functools as ft, http.server, threading
    www = tmp_path / "www"
    www.mkdir()
    handler = ft.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NOPROP_DATA_URL", f"http://127.0.0.1:{server.server_address[1]}/")

    def serve(name, corrupt=False):
        files, arrays = canonical_files(name, np.random.default_rng(0))
        for f, blob in files.items():
            (www / f).write_bytes(blob)  # the test's small files stand in for the canonical ones
        monkeypatch.setitem(data.SOURCES, name, (data.SOURCES[name][0], {
            f: (len(b), "0" * 64 if corrupt else __import__("hashlib").sha256(b).hexdigest()) for f, b in files.items()}))
        return arrays

    yield serve
    server.shutdown()


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_download_verifies_converts_and_loads_every_dataset(tmp_path, mirror, name):
    arrays = mirror(name)
    x, y, x_te, y_te = data.load_dataset(name, str(tmp_path / "cache"))
    np.testing.assert_array_equal(x, arrays["x_train"] / np.float32(255))
    np.testing.assert_array_equal(y, arrays["y_train"]), np.testing.assert_array_equal(y_te, arrays["y_test"])
    np.testing.assert_array_equal(x_te, arrays["x_test"] / np.float32(255))
    assert sorted(os.listdir(tmp_path / "cache")) == [f"{name}.npz"]  # nothing else left behind


def test_wrong_checksum_is_one_line_and_leaves_no_file(tmp_path, mirror):
    mirror("fashion_mnist", corrupt=True)
    with pytest.raises(ValueError, match="SHA-256 [0-9a-f]{64} is not the expected 0{64}; file discarded") as e:
        data.load_dataset("fashion_mnist", str(tmp_path / "cache"))
    assert "\n" not in str(e.value) and os.listdir(tmp_path / "cache") == []


def test_refused_connection_fails_in_seconds_and_offline_never_connects(tmp_path, monkeypatch):
    import socket, time
    with socket.socket() as s:  # bound, never listening: connections are refused, and no other process can take the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setenv("NOPROP_DATA_URL", f"http://127.0.0.1:{port}")
        t0 = time.time()
        with pytest.raises(ValueError, match=f"could not download http://127.0.0.1:{port}/mnist.npz"):
            data.load_dataset("mnist", str(tmp_path))
        assert time.time() - t0 < 5
    with pytest.raises(ValueError, match="no cifar10.npz in .* and --offline forbids downloading it"):
        data.load_dataset("cifar10", str(tmp_path), offline=True)
    assert not any(p.name.endswith(".npz") for p in tmp_path.iterdir())


def test_first_run_downloads_then_trains(tmp_path, mirror, capsys):
    mirror("mnist")  # 5 training images: one batch of 4
    import train_dt
    record, _ = train_dt.main(["--data-dir", str(tmp_path / "cache"), "--T", "1", "--block", "mlp", "--batch-size", "4",
                               "--epochs", "1", "--eval-runs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert "downloading http://127.0.0.1" in err and "mnist.npz" in err and len(record["history"]) == 1
    assert (tmp_path / "cache" / "mnist.npz").exists()
