"""The training loop shared by the three scripts: batches on the device, one jitted step,
evaluation, per-epoch checkpoints and JSON, a NaN guard, progress, and --devices sharding.

Nothing here is the paper: the losses and predictors come in as functions from noprop.py.
"""
import functools
import json
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

import noprop
from harness.checkpoint import load_checkpoint, save_checkpoint


def train_step(params, state, opt_state, key, x, y, *, loss_fn, optimizer):
    """One optimiser step on loss_fn(params, state, key, x, y) -> (loss, (state, aux))."""
    (loss, (state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, key, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss, aux


def jit_step(loss_fn, optimizer, step=train_step, **kw):
    """jax.jit of a training step (train_step, or train_steps) as the scripts compile it: on a CPU,
    with noprop.KEEP_BARRIERS."""
    options = noprop.KEEP_BARRIERS if jax.default_backend() == "cpu" else None
    return jax.jit(functools.partial(step, loss_fn=loss_fn, optimizer=optimizer, **kw), compiler_options=options)


def train_steps(tree, keys, batches, x, y, *, loss_fn, optimizer, batch_sharding=None):
    """Several train_steps as one lax.scan (one call from Python, no dispatch between steps).

    tree: {"params", "state", "opt_state"}; keys (n, 2) and batches (n, B) index the data x, y.
    batch_sharding: where each batch lives (split over devices for data parallelism).
    Returns (tree after the n steps, losses (n,), aux with a leading axis n).
    """
    def body(tree, inp):
        k, idx = inp
        xb, yb = x[idx], y[idx]
        if batch_sharding is not None:
            xb, yb = jax.lax.with_sharding_constraint((xb, yb), batch_sharding)
        params, state, opt_state, loss, aux = train_step(*tree, k, xb, yb, loss_fn=loss_fn, optimizer=optimizer)
        return (params, state, opt_state), (loss, aux)

    (params, state, opt_state), (losses, aux) = jax.lax.scan(
        body, (tree["params"], tree["state"], tree["opt_state"]), (keys, batches))
    return {"params": params, "state": state, "opt_state": opt_state}, losses, aux


STEPS_PER_CALL = 20  # at most this many steps per compiled call: a progress line after each call


def steps_per_call(steps, most=STEPS_PER_CALL):
    """The largest divisor of an epoch's steps that is at most `most`: every call has one shape."""
    return max(k for k in range(1, min(most, steps) + 1) if steps % k == 0)


TRAIN_EVAL = 10_000  # train accuracy is measured on the first 10,000 training images (paper: NOT SPECIFIED)
EVAL_CHUNK = 1000  # images per predict call in evaluate: one compiled shape, bounded memory


class EmaState(NamedTuple):
    count: jax.Array
    ema: optax.Params


def track_ema(decay):
    """An optax transformation that leaves the updates alone and keeps an average of the weights:
    ema <- d ema + (1 - d) params, with d = min(decay, (1 + n) / (10 + n)) after n steps."""
    def init(params):
        return EmaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.asarray, params))

    def update(updates, state, params):
        d = jnp.minimum(decay, (1.0 + state.count) / (10.0 + state.count))
        new = jax.tree.map(lambda e, p, u: d * e + (1 - d) * (p + u), state.ema, params, updates)
        return updates, EmaState(state.count + 1, new)

    return optax.GradientTransformation(init, update)


def predictions(predict, params, state, key, x, runs, chunk=EVAL_CHUNK):
    """Class predictions (runs, N) of `runs` independent inference runs (fresh z_0, eps each run).

    predict(params, state, key, x) sees images only: labels are never passed to inference.
    """
    n = len(x)
    chunk = min(chunk, n)  # a small test set (--test-limit) is one chunk, not padded to a full one
    pad = -n % chunk
    xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]).reshape((-1, chunk) + x.shape[1:])
    out = []
    for r in range(runs):
        keys = jax.random.split(jax.random.fold_in(key, r), len(xs))
        out.append(np.concatenate([predict(params, state, k, xb) for k, xb in zip(keys, xs)])[:n])
    return np.stack(out)


def accuracies(preds, y):
    """Accuracy of each inference run's predictions (runs, N); labels are used here, for scoring only."""
    return [float(np.mean(p == np.asarray(y))) for p in preds]


def evaluate(predict, params, state, key, x, y, runs, chunk=EVAL_CHUNK):
    """Accuracy of each of `runs` inference runs."""
    return accuracies(predictions(predict, params, state, key, x, runs, chunk), y)


def eval_weights(tree, ema):
    """The weights a run evaluates: the moving average in opt_state (track_ema) if it keeps one."""
    return tree["opt_state"][-1].ema if ema else tree["params"]


def class_recall(preds, y):
    """Per class: the fraction of its images predicted as it, over all runs (a dead class shows as 0)."""
    return [float(np.mean(preds[:, y == c] == c)) if (y == c).any() else None for c in range(int(y.max()) + 1)]


def mean_stderr(values):
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def progress(i, n, t0, quiet):
    """One-line progress bar with ETA on stderr (--quiet turns it off)."""
    if quiet:
        return
    done = (i + 1) / n
    eta = (time.time() - t0) / done * (1 - done)
    line = f"  [{'#' * int(30 * done):<30}] {i + 1}/{n} eta {eta:4.0f}s"
    print("\r" + (line if i + 1 < n else " " * len(line) + "\r"), end="", file=sys.stderr, flush=True)


def place(tree, variant, n):
    """--devices n, with jax.sharding: where the training state and each batch live.

    NoProp-DT splits its stacked block axis over the devices, so each device trains T/n blocks
    and only the shared classifier and W_embed gradients cross devices. CT, FM and backprop
    split the batch (data parallel). jit inserts the collectives; the math is unchanged (tested).
    Returns (tree placed on the devices, sharding for a batch).
    """
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("dev",))
    split, whole = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s)) for s in (("dev",), ()))

    def where(path, _):
        keys = [getattr(k, "key", None) for k in path]
        return split if variant == "dt" and (keys[0] == "state" or "blocks" in keys) else whole

    return jax.device_put(tree, jax.tree_util.tree_map_with_path(where, tree)), (whole if variant == "dt" else split)


def gather(tree):
    """The whole of every array on this host (several processes hold parts of the training state)."""
    return multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else tree


def holdings(tree, variant):
    """One line: what this process holds and trains (its blocks for DT; all weights otherwise)."""
    leaf = jax.tree.leaves(tree["params"]["blocks"] if variant == "dt" else tree["params"])[0]
    head = f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} device(s): "
    if variant != "dt":
        return head + "a full copy of the weights, its share of each batch"
    rows = sorted({s.index[0].indices(leaf.shape[0])[:2] for s in leaf.addressable_shards})
    return head + "blocks " + ", ".join(f"{a + 1}" + (f"-{b}" if b > a + 1 else "") for a, b in rows) + f" of {leaf.shape[0]}"


def device_count(args, variant):
    """--devices 0 (default): all local devices, or the most that divide the split axis.
    Several processes: every device of every process takes part."""
    size, what = (args.T, "T") if variant == "dt" else (args.batch_size, "--batch-size")
    if jax.process_count() > 1:
        n = jax.device_count()
        if args.devices not in (0, n):
            sys.exit(f"error: --devices {args.devices}, but the {jax.process_count()} processes have {n} devices, "
                     "and all of them train")
        if size % n:
            sys.exit(f"error: {n} devices over {jax.process_count()} processes must divide {what} = {size}")
        return n
    n = args.devices or max(k for k in range(1, jax.local_device_count() + 1) if size % k == 0)
    if n > jax.device_count():
        sys.exit(f"error: --devices {n}, but only {jax.device_count()} device(s) are visible")
    if size % n:
        sys.exit(f"error: --devices {n} must divide {what} = {size}")
    return n


def fit(args, loss_fn, predict, params, state, optimizer, data, key, also=None):
    """Train for args.epochs, evaluate, checkpoint and write JSON each epoch. Returns the record.

    also: {name: predict} of other inference modes, each scored on the test set as test_acc_{name}.

    Randomness depends only on (seed, epoch, step), so a resumed run repeats an uninterrupted one.
    """
    x_tr, y_tr, x_te, y_te = data
    variant = args.variant
    x_fit, y_fit = x_tr[:TRAIN_EVAL], y_tr[:TRAIN_EVAL]  # train accuracy: the first 10,000 training images
    k_train, k_eval = jax.random.split(key)
    B, steps = args.batch_size, len(x_tr) // args.batch_size  # drop the last partial batch
    if getattr(args, "ema", 0):  # evaluate an exponential moving average of the weights, kept in opt_state
        optimizer = optax.chain(optimizer, track_ema(args.ema))
    tree = {"params": params, "state": state, "opt_state": optimizer.init(params)}
    n_dev = device_count(args, variant)
    ident = {k: getattr(args, k) for k in ("dataset", "embedding", "seed", "batch_size", "train_limit")}
    ident["variant"] = variant
    ckpt = os.path.join(args.checkpoint_dir, "checkpoint.npz") if args.checkpoint_dir else None
    record = {**ident, "args": vars(args), "jax": jax.__version__, "device": jax.devices()[0].device_kind, "devices": n_dev,
              "processes": jax.process_count(), "history": [], "train_seconds": 0.0}
    lead = jax.process_index() == 0  # process 0 writes the JSON and the checkpoints
    if args.resume and not os.path.exists(ckpt):
        print(f"no checkpoint at {ckpt} yet: starting from scratch")
    elif args.resume:
        try:
            tree, meta = load_checkpoint(ckpt, tree, ident)
        except ValueError as e:
            sys.exit(f"error: {e}")
        record.update(history=meta["history"], train_seconds=meta["train_seconds"])
        print(f"resumed from {ckpt} after epoch {len(record['history'])}")
    tree, batch_sharding = place(tree, variant, n_dev)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    x_tr, y_tr = jax.device_put((x_tr, y_tr), replicated)  # the training set on every device; batches are gathered there
    run_steps = jit_step(loss_fn, optimizer, train_steps, batch_sharding=batch_sharding)
    if jax.process_count() > 1:
        print(holdings(tree, variant), file=sys.stderr, flush=True)
    if len(record["history"]) < args.epochs and not args.quiet:
        print("compiling the training step...", flush=True)
    for epoch in range(len(record["history"]), args.epochs):
        k_epoch = jax.random.fold_in(k_train, epoch)
        batches = jax.random.permutation(k_epoch, len(x_tr))[:steps * B].reshape(steps, B)
        keys = jax.random.split(jax.random.fold_in(k_epoch, 1), steps)
        t0, losses, auxes, n = time.time(), [], [], steps_per_call(steps)
        for i in range(0, steps, n):
            tree, loss, aux = run_steps(tree, *jax.device_put((keys[i:i + n], batches[i:i + n]), replicated), x_tr, y_tr)
            losses.append(loss.block_until_ready()), auxes.append(aux)  # honest ETA
            progress(i + n - 1, steps, t0, args.quiet)
        losses, aux = gather((jnp.concatenate(losses), jax.tree.map(lambda *a: jnp.concatenate(a), *auxes)))
        check_finite(epoch, losses, aux, tree, ckpt)
        seconds = time.time() - t0
        last = epoch + 1 == args.epochs
        runs = args.eval_runs if last else 1
        weights, bn = gather((eval_weights(tree, getattr(args, "ema", 0)), tree["state"]))  # each process evaluates all
        preds = predictions(predict, weights, bn, k_eval, x_te, runs)
        accs = accuracies(preds, y_te)
        train_accs = evaluate(predict, weights, bn, jax.random.fold_in(k_eval, 1), x_fit, y_fit, runs)
        others = {f"test_acc_{name}": float(np.mean(evaluate(p, weights, bn, k_eval, x_te, y_te, runs)))
                  for name, p in (also or {}).items()}
        record["train_seconds"] += seconds
        record["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                                  "train_seconds": seconds, "images_per_s": steps * B / seconds,
                                  "train_acc": float(np.mean(train_accs)), "test_acc": float(np.mean(accs)), **others,
                                  "terms": {k: np.asarray(v.mean(0)).tolist() for k, v in aux.items()}})
        print(f"epoch {epoch + 1:3d}  loss {record['history'][-1]['loss']:.4f}  train {seconds:6.1f}s  "
              f"{steps * B / seconds:6.0f} img/s  train acc {100 * np.mean(train_accs):.2f}%  "
              f"test acc {100 * np.mean(accs):.2f}%" + "".join(f"  {k[9:]} {100 * v:.2f}%" for k, v in others.items()), flush=True)
        if last:
            mean, se = mean_stderr(accs)
            tr_mean, tr_se = mean_stderr(train_accs)
            record.update(epochs=args.epochs, test_accs=accs, test_acc_mean=mean, test_acc_stderr=se,
                          train_accs=train_accs, train_acc_mean=tr_mean, train_acc_stderr=tr_se,
                          test_class_recall=class_recall(preds, np.asarray(y_te)))
            print(f"over {len(accs)} inference runs: test accuracy {100 * mean:.2f} +- {100 * se:.2f}, "
                  f"train {100 * tr_mean:.2f} +- {100 * tr_se:.2f} (s.e.)")
        if ckpt:
            whole = gather(tree)
            if lead:
                save_checkpoint(ckpt, whole, {**ident, "history": record["history"], "train_seconds": record["train_seconds"]})
        if args.out and lead:
            write_json(args.out, record)
    return record, tree


@jax.jit
def all_finite(tree):
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def check_finite(epoch, losses, aux, tree, ckpt):
    """NaN/inf guard: stop naming the first bad step and loss term; the last checkpoint stays."""
    ok = np.isfinite(losses)
    losses_ok = bool(ok.all())
    if losses_ok and bool(gather(all_finite(tree["params"]))):
        return
    i = len(losses) - 1 if losses_ok else int(np.argmin(ok))
    bad = [k for k, v in aux.items() if not bool(np.isfinite(v[i]).all())] or ["parameters"]
    kept = f"; last good checkpoint kept at {ckpt}" if ckpt else ""
    sys.exit(f"error: non-finite loss at epoch {epoch + 1}, step {i + 1} (bad: {', '.join(bad)}){kept}")



def write_json(path, obj):
    """JSON written atomically: a reader never sees half a file. Returns obj."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
    return obj
