"""Evaluation: independent inference runs from images alone, scored against the labels afterwards."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

TRAIN_EVAL = 10_000  # train accuracy is measured on the first 10,000 training images (paper: NOT SPECIFIED)
EVAL_CHUNK = 1000  # images per predict call: one compiled shape, bounded memory


def inference_modes(variant):
    """{name: jitted predict}: "" is the run's own mode (test_acc), any other is scored as test_acc_{name}.

    DT and CT have several (variant.modes: Eq. 3 with its noise, without it, CT's probability-flow ODE); the
    first (--deterministic, --sampler) is the run's own; the other variants have one mode.
    """
    if not variant.modes:
        return {"": jax.jit(variant.predict)}
    return {("" if i == 0 else n): jax.jit(partial(variant.predict, **kw)) for i, (n, kw) in enumerate(variant.modes)}


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


def class_recall(preds, y):
    """Per class: the fraction of its images predicted as it, over all runs (a dead class shows as 0)."""
    return [float(np.mean(preds[:, y == c] == c)) if (y == c).any() else None for c in range(int(y.max()) + 1)]


def mean_stderr(values):
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def score(modes, params, state, key, data, runs, train_n=TRAIN_EVAL):
    """After an epoch: test accuracies and predictions of the run's mode, train accuracies on the first
    train_n training images (none if 0), and the mean test accuracy of every other mode."""
    x_tr, y_tr, x_te, y_te = data
    preds = predictions(modes[""], params, state, key, x_te, runs)
    train = predictions(modes[""], params, state, jax.random.fold_in(key, 1), x_tr[:train_n], runs) if train_n else []
    others = {f"test_acc_{name}": float(np.mean(accuracies(predictions(p, params, state, key, x_te, runs), y_te)))
              for name, p in modes.items() if name}
    return {"test": accuracies(preds, y_te), "train": accuracies(train, y_tr[:train_n]), "preds": preds, "others": others}
