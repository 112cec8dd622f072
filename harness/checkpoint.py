"""Checkpoints: a pytree's leaves and a JSON record in one .npz (no pickle), written atomically."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


def checkpoint_file(checkpoint_dir):
    """Where a run keeps its checkpoint: --checkpoint-dir/checkpoint.npz, or None without one."""
    return os.path.join(checkpoint_dir, "checkpoint.npz") if checkpoint_dir else None


def save_checkpoint(path, tree, meta):
    """Write the pytree's leaves and a JSON `meta` to `path`, atomically."""
    arrays = {jax.tree_util.keystr(k): np.asarray(v)
              for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    arrays["__meta__"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))  # a kill at any moment leaves the last complete file


def atomic_write(path, write):
    """write(f) into path + ".tmp", then rename it to path: a reader never sees half a file. A failed write (disk
    full) stops the run with one line and leaves neither the .tmp nor a damaged file; the last complete one stays."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        sys.exit(f"error: could not write {path}: {e.strerror or e}")


def load_checkpoint(path, template, expect):
    """Read a checkpoint into the structure of `template`; refuse mismatches with ValueError."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})")
    for k, v in expect.items():
        if meta.get(k) != v:
            raise ValueError(f"{path}: checkpoint has {k}={meta.get(k)!r}, this run has {v!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for kp, ref in leaves:
        name, a = jax.tree_util.keystr(kp), arrays.get(jax.tree_util.keystr(kp))
        if a is None or a.shape != np.shape(ref) or a.dtype != np.asarray(ref).dtype:
            got = "missing" if a is None else f"{a.dtype}{a.shape}"
            raise ValueError(f"{path}: {name} is {got}, expected {np.asarray(ref).dtype}{np.shape(ref)}")
        out.append(jnp.asarray(a))
    return jax.tree_util.tree_unflatten(treedef, out), meta


# flags that say how long a run goes, how it is scored or where it runs: a resume may change these, no others
MAY_CHANGE = {"epochs", "eval_runs", "test_limit", "train_eval", "deterministic", "sampler", "out", "checkpoint_dir", "resume",
              "quiet", "plot", "data_dir", "offline", "tfds", "devices", "coordinator", "num_processes", "process_id"}


def resume(args, tree, record, ident):
    """--resume: the training state after the last finished epoch in --checkpoint-dir, its history
    and seconds put into `record`; without a checkpoint there yet, `tree` as it is. A checkpoint trained
    with other settings (e.g. --lr) is refused."""
    path = checkpoint_file(args.checkpoint_dir) if args.resume else None
    if path and not os.path.exists(path):
        print(f"no checkpoint at {path} yet: starting from scratch")
    elif path:
        try:
            tree, meta = load_checkpoint(path, tree, ident)
        except ValueError as e:
            sys.exit(f"error: {e}")
        was = meta.get("args", {})
        for k, v in record["args"].items():
            if k in was and k not in MAY_CHANGE and was[k] != v:
                sys.exit(f"error: {path} was trained with --{k.replace('_', '-')} {was[k]}, this run has {v}: "
                         "resume with the same flags, or use another --checkpoint-dir")
        record.update(history=meta["history"], train_seconds=meta["train_seconds"])
        print(f"resumed from {path} after epoch {len(record['history'])}")
    return tree
