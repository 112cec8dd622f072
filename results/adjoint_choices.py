"""Is one of the adjoint baseline's unspecified choices why it learns CIFAR more slowly than the paper's?

python -m results.adjoint_choices --out results/adjoint_choices.json > results/adjoint_choices.log

The paper does not give the adjoint's z(0), ODE network or solver. Ours (noprop.loss_adjoint): z(0) ~ N(0, I);
the CT model, whose image path has dropout 0.2, read through W_embed; forward Euler over t in [0, 1]. This
trains it on a CIFAR-10 slice (the first 10,240 training images, seed 0, 20 Euler steps to keep it cheap) with
one choice changed at a time, and prints test accuracy on the first 2,000 test images after each epoch.
"""
import argparse
import json
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import noprop  # noqa: E402
from harness import evaluate, loop  # noqa: E402
from harness.data import default_data_dir, load_dataset  # noqa: E402

# name: (z(0) scale, dropout in the image path, horizon H: dz/dt is H times the field, t in [0, H], Euler steps)
CHOICES = {"ours": (1.0, True, 1.0, 20), "z0 = 0": (0.0, True, 1.0, 20), "no dropout": (1.0, False, 1.0, 20),
           "horizon 10": (1.0, True, 10.0, 20), "horizon 100": (1.0, True, 100.0, 20), "100 steps": (1.0, True, 1.0, 100)}


def field(params, x, key, horizon):
    """The adjoint's vector field H * flow(...) and its arguments; key=None: no dropout."""
    W = noprop.class_embeddings(params)
    args = {"model": params["model"], "feats": noprop.continuous_features(params["model"], x, key), "W": W}
    return (lambda z, t, a: horizon * noprop.flow(a["model"], a["feats"], a["W"], x.shape[1:])(t, z)), args


def loss(params, state, key, x, y, z0=1.0, dropout=True, horizon=1.0, steps=20):
    """noprop.loss_adjoint with one choice changed (the defaults are it at `steps`)."""
    k0, k_drop = jax.random.split(key)
    f, args = field(params, x, k_drop if dropout else None, horizon)
    z1 = noprop.odeint_adjoint(f, z0 * jax.random.normal(k0, (x.shape[0], args["W"].shape[1])), args, steps)
    ce = noprop.cross_entropy(noprop.dense(params["classifier"], z1), y)
    return ce, (state, {"ce": ce})


def predict(params, state, key, x, z0=1.0, dropout=True, horizon=1.0, steps=20):
    """noprop.predict_adjoint with the same choice."""
    f, args = field(params, x, None, horizon)
    z = z0 * jax.random.normal(key, (x.shape[0], args["W"].shape[1]))
    return jnp.argmax(noprop.dense(params["classifier"], noprop.euler_chain(z, lambda t, z_: f(z_, t, args), steps)), -1)


def run(choice, data, epochs, seed=0):
    """Test accuracy (%) after each epoch, and seconds per epoch, of the adjoint trained with one choice."""
    x, y, x_te, y_te = data
    kw = dict(zip(("z0", "dropout", "horizon", "steps"), CHOICES[choice]))
    optimizer = optax.adamw(1e-3, weight_decay=1e-3)  # Table 4's, as noprop's adjoint
    key = jax.random.PRNGKey(seed)
    params, state = noprop.init_adjoint(key, x.shape[1:], 10, "onehot")
    tree = {"params": params, "state": state, "opt_state": optimizer.init(params)}
    steps = loop.jit_step(partial(loss, **kw), optimizer, loop.train_steps)
    test_predict = jax.jit(partial(predict, **kw))  # compiled once, not once per epoch
    acc, secs = [], []
    for epoch in range(epochs):
        tree, _, _, s = loop.train_epoch(steps, tree, x, y, jax.random.fold_in(key, epoch), 128, quiet=True)
        preds = evaluate.predictions(test_predict, tree["params"], state, key, x_te, 1)
        acc.append(100 * evaluate.accuracies(preds, y_te)[0]), secs.append(s)
        print(f"{choice:12s} epoch {epoch + 1}  test {acc[-1]:.2f} %  {s:.0f} s", flush=True)
    return {"test_acc": acc, "seconds": secs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--train", type=int, default=10_240, help="first N training images")
    p.add_argument("--test", type=int, default=2000, help="first N test images")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--choices", default=",".join(CHOICES), help="comma-separated, from: " + ", ".join(CHOICES))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    unknown = set(a.choices.split(",")) - set(CHOICES)
    if unknown:
        p.error(f"unknown choice(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHOICES)}")
    x, y, x_te, y_te = load_dataset("cifar10", a.data_dir)
    data = tuple(jnp.asarray(v) for v in (x[:a.train], y[:a.train], x_te[:a.test], y_te[:a.test]))
    t0, out = time.time(), {"train_images": a.train, "test_images": a.test, "seed": 0, "runs": {}}
    for choice in a.choices.split(","):
        out["runs"][choice] = run(choice, data, a.epochs)
        loop.write_json(a.out, out)
    print(f"{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
