"""Datasets as numpy arrays: read {data_dir}/{name}.npz, downloading it on first use.

The download needs only the standard library (like jax's examples/datasets.py): it fetches
the dataset's canonical public files, checks each one's SHA-256 against the constants
below, converts them to one .npz (uint8 x (N, H, W, C), integer y; never unpickling
anything) and writes it atomically. NOPROP_DATA_URL replaces every base URL with a mirror
that serves the same file names. A copy prepared by tensorflow-datasets can be read instead
(--tfds); preparing one needs TensorFlow, reading an array_record copy does not.
"""
import gzip
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request

import numpy as np

DATASETS = {"mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
            "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100)}

# name -> (base URL, {file name: (bytes, SHA-256)}): the canonical files (Keras's mnist.npz; the
# checksums TFDS and Keras publish for the others)
SOURCES = {
    "mnist": ("https://storage.googleapis.com/tensorflow/tf-keras-datasets/", {
        "mnist.npz": (11490434, "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1")}),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz": (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz": (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz": (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")}),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", {
        "cifar-10-binary.tar.gz": (170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")}),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/", {
        "cifar-100-binary.tar.gz": (168513733, "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec")}),
}
TIMEOUT = 10  # seconds without an answer before a download gives up


def default_data_dir():
    """$NOPROP_DATA, else the per-user cache ~/.cache/noprop."""
    return os.environ.get("NOPROP_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "noprop")


def load_dataset(name, data_dir=None, offline=False, use_tfds=False):
    """(x_train, y_train, x_test, y_test): float32 images in [0, 1] (N, H, W, C), int32 labels.

    {data_dir}/{name}.npz if present; else a TFDS copy (use_tfds); else downloaded (unless
    offline). NOT SPECIFIED input normalisation: pixels / 255, nothing else. Raises ValueError
    with a one-line message on any problem.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    data_dir = data_dir or default_data_dir()
    path = os.path.join(data_dir, f"{name}.npz")
    if os.path.isfile(path):
        arrays = _read_npz(path)
    elif use_tfds:
        arrays = _read_tfds(name, data_dir, offline)
    elif offline:
        raise ValueError(f"no {name}.npz in {data_dir} and --offline forbids downloading it")
    else:
        download(name, data_dir)
        arrays = _read_npz(path)
    shape, m = DATASETS[name]
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        where = f"{name} {split}"
        if x.ndim == 3 and shape[-1] == 1:
            x = x[..., None]
        if x.shape[1:] != shape or x.dtype != np.uint8:
            raise ValueError(f"{where}: images are {x.dtype}{tuple(x.shape)}, expected uint8(N, {', '.join(map(str, shape))})")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{where}: labels are {y.dtype}{tuple(y.shape)}, expected integer ({len(x)},)")
        if len(y) and (y.min() < 0 or y.max() >= m):
            raise ValueError(f"{where}: labels span {y.min()}..{y.max()}, expected 0..{m - 1}")
        out += [x.astype(np.float32) / 255.0, y.astype(np.int32)]
    return tuple(out)


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in f.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, zlib.error, ...
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})")
    if missing:
        raise ValueError(f"{path}: missing array {', '.join(missing)}; expected x_train, y_train, x_test, y_test")
    return arrays


# --- Download: fetch, verify, convert, write atomically ---

def download(name, data_dir):
    """Write {data_dir}/{name}.npz from the canonical files (or NOPROP_DATA_URL's mirror)."""
    base, files = SOURCES[name]
    base = os.environ.get("NOPROP_DATA_URL") or base
    os.makedirs(data_dir, exist_ok=True)
    blobs = {f: fetch(base.rstrip("/") + "/" + f, size, sha) for f, (size, sha) in files.items()}
    arrays = CONVERT[name](blobs)
    path = os.path.join(data_dir, f"{name}.npz")
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)  # a kill at any moment leaves no half-written {name}.npz
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {path}", file=sys.stderr)


def fetch(url, size, sha256):
    """The file at url, in memory, after checking its SHA-256; a progress bar on stderr."""
    print(f"downloading {url} ({size / 1e6:.1f} MB)", file=sys.stderr)
    h, chunks, got = hashlib.sha256(), [], 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            while chunk := r.read(1 << 20):
                h.update(chunk), chunks.append(chunk)
                got += len(chunk)
                done = min(got / size, 1.0)
                print(f"\r  [{'#' * int(30 * done):<30}] {got / 1e6:.1f}/{size / 1e6:.1f} MB", end="", file=sys.stderr)
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"could not download {url}: {getattr(e, 'reason', e)} "
                         "(offline? set NOPROP_DATA_URL to a mirror, or put the .npz in --data-dir)")
    print(file=sys.stderr)
    if h.hexdigest() != sha256:
        raise ValueError(f"{url}: SHA-256 {h.hexdigest()} is not the expected {sha256}; file discarded")
    return b"".join(chunks)


def _idx(blob):
    """An idx file (gzipped): big-endian dims after a magic number whose last byte is the rank."""
    raw = gzip.decompress(blob)
    rank = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * rank], ">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * rank:], np.uint8).reshape(dims)


def _cifar(blob, members, label_bytes):
    """CIFAR binary records: label byte(s) then 3072 bytes, channel-first; the last label is fine."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = {os.path.basename(m.name): m for m in tar.getmembers()}
        raw = np.concatenate([np.frombuffer(tar.extractfile(names[n]).read(), np.uint8) for n in members])
    rec = raw.reshape(-1, label_bytes + 3072)
    return rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rec[:, label_bytes - 1]


def _mnist(blobs):
    with np.load(io.BytesIO(blobs["mnist.npz"]), allow_pickle=False) as f:
        return {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}


def _fashion(blobs):
    return {f"{a}_{s}": _idx(blobs[f"{p}-{kind}-idx{r}-ubyte.gz"])
            for s, p in (("train", "train"), ("test", "t10k")) for a, kind, r in (("x", "images", 3), ("y", "labels", 1))}


def _cifar10(blobs):
    (xtr, ytr), (xte, yte) = (_cifar(blobs["cifar-10-binary.tar.gz"], m, 1) for m in
                              ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]))
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def _cifar100(blobs):
    (xtr, ytr), (xte, yte) = (_cifar(blobs["cifar-100-binary.tar.gz"], [m], 2) for m in ("train.bin", "test.bin"))
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


CONVERT = {"mnist": _mnist, "fashion_mnist": _fashion, "cifar10": _cifar10, "cifar100": _cifar100}


# --- A copy prepared by tensorflow-datasets ---

def _read_tfds(name, data_dir, offline):
    """Both splits through TFDS's array_record data source (reading needs no TensorFlow)."""
    try:
        import tensorflow_datasets as tfds
        out = {}
        for split in ("train", "test"):
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=not offline,
                                   builder_kwargs={"file_format": "array_record"})
            items = [src[i] for i in range(len(src))]
            out[f"x_{split}"] = np.stack([it["image"] for it in items])
            out[f"y_{split}"] = np.array([it["label"] for it in items])
        return out
    except Exception as e:
        msg = " ".join(str(e).split())
        cause = "TFDS needs TensorFlow to prepare a dataset (pip install tensorflow)" if "tensorflow" in msg.lower() \
            and "No module" in msg else msg[:300]
        raise ValueError(f"{name}: tensorflow-datasets could not read it from {data_dir}: {type(e).__name__}: {cause}")


def prepare_data(args):
    """A run's data: load --dataset, keep the first --train-limit / --test-limit examples, put it on the device."""
    if not args.quiet:
        print(f"loading {args.dataset} from {args.data_dir}...", flush=True)
    try:
        x_tr, y_tr, x_te, y_te = load_dataset(args.dataset, args.data_dir, args.offline, args.tfds)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.train_limit:
        x_tr, y_tr = x_tr[:args.train_limit], y_tr[:args.train_limit]
    if args.test_limit:
        x_te, y_te = x_te[:args.test_limit], y_te[:args.test_limit]
    if not len(x_te):
        sys.exit(f"error: {args.dataset} has no test images in {args.data_dir}: nothing to evaluate on")
    if len(x_tr) < args.batch_size:
        sys.exit(f"error: {len(x_tr)} training examples is fewer than one batch of {args.batch_size}")
    import jax  # the rest of this module needs only numpy and the standard library
    return tuple(jax.device_put(a) for a in (x_tr, y_tr, x_te, y_te))
