"""The epoch loop the three scripts share: fit() trains, checks, evaluates, records and checkpoints.

A run flows: script (flags, data, Variant, init) -> fit: for each epoch, train_epoch's steps (the
jitted noprop.train_step over the Variant's loss, noprop.loss_dt, ...), the NaN guard, the Variant's
predict on test and train images (harness.evaluate), the record (JSON) and a checkpoint
(harness.checkpoint). Several devices or processes enter only through harness.processes: spread
places the state before the loop, gather collects it after each epoch; on one device both change nothing.
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

import noprop
from harness import evaluate, processes
from harness.checkpoint import atomic_write, checkpoint_file, resume, save_checkpoint


def jit_step(loss_fn, optimizer, step=noprop.train_step, **kw):
    """jax.jit of a training step (noprop.train_step, or train_steps) as the scripts compile it."""
    return jax.jit(functools.partial(step, loss_fn=loss_fn, optimizer=optimizer, **kw))


def train_steps(tree, keys, batches, x, y, *, loss_fn, optimizer, batch_sharding=None):
    """Several noprop.train_steps as one lax.scan (one call from Python, no dispatch between steps).

    tree: {"params", "state", "opt_state"}; keys (n, 2) and batches (n, B) index the data x, y.
    batch_sharding: where each batch lives (split over devices for data parallelism).
    Returns (tree after the n steps, losses (n,), aux with a leading axis n).
    """
    def body(tree, inp):
        k, idx = inp
        xb, yb = x[idx], y[idx]
        if batch_sharding is not None:
            xb, yb = jax.lax.with_sharding_constraint((xb, yb), batch_sharding)
        params, state, opt_state, loss, aux = noprop.train_step(*tree, k, xb, yb, loss_fn=loss_fn, optimizer=optimizer)
        return (params, state, opt_state), (loss, aux)

    (params, state, opt_state), (losses, aux) = jax.lax.scan(
        body, (tree["params"], tree["state"], tree["opt_state"]), (keys, batches))
    return {"params": params, "state": state, "opt_state": opt_state}, losses, aux


STEPS_PER_CALL = 20  # at most this many steps per compiled call: a progress line after each call


def steps_per_call(steps, most=STEPS_PER_CALL):
    """The largest divisor of an epoch's steps that is at most `most`: every call has one shape."""
    return max(k for k in range(1, min(most, steps) + 1) if steps % k == 0)


def train_epoch(run_steps, tree, x, y, key, batch_size, quiet):
    """One pass over (x, y) in shuffled batches (the last partial one dropped), in calls of up to
    STEPS_PER_CALL steps. Returns (tree, losses (steps,), aux with a leading axis steps, seconds)."""
    t0, steps = time.time(), len(x) // batch_size
    batches = jax.random.permutation(key, len(x))[:steps * batch_size].reshape(steps, batch_size)
    keys = jax.random.split(jax.random.fold_in(key, 1), steps)
    losses, auxes, n = [], [], steps_per_call(steps)
    for i in range(0, steps, n):
        tree, loss, aux = run_steps(tree, *jax.device_put((keys[i:i + n], batches[i:i + n]), x.sharding), x, y)
        losses.append(loss.block_until_ready()), auxes.append(aux)  # honest ETA
        progress(i + n - 1, steps, t0, quiet)
    return tree, jnp.concatenate(losses), jax.tree.map(lambda *a: jnp.concatenate(a), *auxes), time.time() - t0


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


def with_ema(optimizer, ema):
    """The optimiser, keeping a moving average of the weights in its state when ema > 0 (CT's --ema)."""
    return optax.chain(optimizer, track_ema(ema)) if ema else optimizer


def eval_weights(tree, ema):
    """The weights a run evaluates: the moving average in opt_state (track_ema) if it keeps one."""
    return tree["opt_state"][-1].ema if ema else tree["params"]


def progress(i, n, t0, quiet):
    """One-line progress bar with ETA on stderr (--quiet turns it off)."""
    if quiet:
        return
    done = (i + 1) / n
    eta = (time.time() - t0) / done * (1 - done)
    line = f"  [{'#' * int(30 * done):<30}] {i + 1}/{n} eta {eta:4.0f}s"
    print("\r" + (line if i + 1 < n else " " * len(line) + "\r"), end="", file=sys.stderr, flush=True)


@jax.jit
def all_finite(tree):
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def check_finite(epoch, losses, aux, tree, checkpoint_dir):
    """NaN/inf guard: stop naming the first bad step and loss term; the last checkpoint stays."""
    ok = np.isfinite(losses)
    losses_ok = bool(ok.all())
    if losses_ok and bool(all_finite(tree["params"])):
        return
    ckpt = checkpoint_file(checkpoint_dir)
    i = len(losses) - 1 if losses_ok else int(np.argmin(ok))
    bad = [k for k, v in aux.items() if not bool(np.isfinite(v[i]).all())] or ["parameters"]
    kept = f"; last good checkpoint kept at {ckpt}" if ckpt and os.path.exists(ckpt) else "; no checkpoint written yet"
    sys.exit(f"error: non-finite loss at epoch {epoch + 1}, step {i + 1} (bad: {', '.join(bad)}){kept}")


def describe(variant, args, params, data):
    """The run's first line: the variant, its network's size, the data, the device."""
    if args.variant in ("dt", "backprop"):  # T stacked blocks
        net = f"T={args.T} {args.block} blocks of {noprop.count_params(params['blocks']) // args.T:,} parameters"
    else:
        net = f"model of {noprop.count_params(params['model']):,} parameters, {args.steps} steps"
    return (f"{variant.name} {args.dataset} {args.embedding}: {net}, {len(data[0])} train / {len(data[2])} test images, "
            f"{jax.devices()[0].device_kind}")


IDENT = ("variant", "dataset", "embedding", "seed", "batch_size", "train_limit")  # a checkpoint must match these


def new_record(args):
    """The run's JSON record before its first epoch: settings, versions, the device (fit adds how many train)."""
    settings = vars(args).copy()
    return {**{k: settings[k] for k in IDENT}, "args": settings, "jax": jax.__version__,
            "device": jax.devices()[0].device_kind, "processes": jax.process_count(),
            "history": [], "train_seconds": 0.0}


def log_epoch(record, epochs, losses, aux, seconds, scores, y_test):
    """Append an epoch to the record and print its line; after the last, the accuracies over all runs and
    each class's recall."""
    record["train_seconds"] += seconds
    n = len(losses) * record["batch_size"]
    train = {"train_acc": float(np.mean(scores["train"]))} if scores["train"] else {}  # none with --train-eval 0
    record["history"].append({"epoch": len(record["history"]) + 1, "loss": float(np.mean(losses)), "train_seconds": seconds,
                              "images_per_s": n / seconds, **train, "test_acc": float(np.mean(scores["test"])),
                              **scores["others"], "terms": {k: np.asarray(v.mean(0)).tolist() for k, v in aux.items()}})
    h = record["history"][-1]
    print(f"epoch {h['epoch']:3d}  loss {h['loss']:.4f}  train {seconds:6.1f}s  {n / seconds:6.0f} img/s  "
          + (f"train acc {100 * h['train_acc']:.2f}%  " if train else "") + f"test acc {100 * h['test_acc']:.2f}%"
          + "".join(f"  {k[9:]} {100 * v:.2f}%" for k, v in scores["others"].items()), flush=True)
    if h["epoch"] == epochs:
        mean, se = evaluate.mean_stderr(scores["test"])
        record.update(epochs=epochs, test_accs=scores["test"], test_acc_mean=mean, test_acc_stderr=se,
                      test_class_recall=evaluate.class_recall(scores["preds"], np.asarray(y_test)))
        line = f"over {len(scores['test'])} inference runs: test accuracy {100 * mean:.2f} +- {100 * se:.2f}"
        if train:
            tr_mean, tr_se = evaluate.mean_stderr(scores["train"])
            record.update(train_accs=scores["train"], train_acc_mean=tr_mean, train_acc_stderr=tr_se)
            line += f", train {100 * tr_mean:.2f} +- {100 * tr_se:.2f}"
        print(line + " (s.e.)")


def fit(args, variant, params, state, data, key):
    """Train for args.epochs; after each epoch evaluate, and write the record and a checkpoint.

    Returns (record, tree). Randomness depends only on (seed, epoch, step), so a resumed run
    repeats an uninterrupted one.
    """
    print(describe(variant, args, params, data))
    ema = getattr(args, "ema", 0)  # CT: evaluate a moving average of the weights
    optimizer = with_ema(variant.optimizer, ema)
    record = new_record(args)
    tree = resume(args, {"params": params, "state": state, "opt_state": optimizer.init(params)}, record,
                  {k: record[k] for k in IDENT})
    tree, (x, y), batch_sharding, record["devices"] = processes.spread(args, tree, data[:2])  # one device: as is
    run_steps = jit_step(variant.loss, optimizer, train_steps, batch_sharding=batch_sharding)
    modes = evaluate.inference_modes(variant)  # {name: jitted predict}
    k_train, k_eval = jax.random.split(key)
    if len(record["history"]) < args.epochs and not args.quiet:
        print("compiling the training step...", flush=True)
    for epoch in range(len(record["history"]), args.epochs):
        tree, losses, aux, seconds = train_epoch(run_steps, tree, x, y, jax.random.fold_in(k_train, epoch),
                                                 args.batch_size, args.quiet)
        whole, losses, aux = processes.gather((tree, losses, aux))  # several processes: each holds a part
        check_finite(epoch, losses, aux, whole, args.checkpoint_dir)
        last = epoch + 1 == args.epochs
        scores = evaluate.score(modes, eval_weights(whole, ema), whole["state"], k_eval, data,
                                args.eval_runs if last else 1, args.train_eval)
        log_epoch(record, args.epochs, losses, aux, seconds, scores, data[3])
        if jax.process_index() == 0:
            write_epoch(args.checkpoint_dir, whole, record, args.out)
    return record, tree


def write_epoch(checkpoint_dir, tree, record, out):
    """Process 0, after each epoch: the checkpoint (with the record's history) and the JSON, each atomically."""
    if checkpoint_dir:
        meta = {**{k: record[k] for k in IDENT}, "args": record["args"], "history": record["history"],
                "train_seconds": record["train_seconds"]}
        save_checkpoint(checkpoint_file(checkpoint_dir), tree, meta)
    if out:
        write_json(out, record)


def write_json(path, obj):
    """JSON written atomically: a reader never sees half a file. Returns obj."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))
    return obj

