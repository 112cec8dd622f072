"""Where does coupled L2 outweigh the data under Adam? NoProp-CT's weights at init, and a run from a larger init.

Table 4's "Adam, weight decay 1e-3" adds 1e-3 w to each gradient before Adam divides it by its own running RMS. A
weight whose data gradient stays under 1e-3 |w| then moves toward 0 by about the learning rate a step, however
little the loss needs it to (L2's cost of the whole init, 0.5e-3 |theta|^2, is 0.27 on CIFAR-100 against an Eq. 9
term of 3.0 after the first epoch).
For each weight matrix of CT's model, this prints, over 20 batches of 128 at init: the RMS of Eq. 9's data gradient,
1e-3 x RMS(w), their ratio, and the share of coordinates whose data gradient's RMS is under 1e-3 |w| (those Adam
empties first).

--gain G multiplies every weight matrix of the init (model and classifier; not the biases, not the schedule): G =
sqrt(6) = 2.449 turns PyTorch's default U(+-1/sqrt(fan_in)), which divides a ReLU layer's output variance by about 6,
into He's U(+-sqrt(6/fan_in)), which keeps it. --train then trains CT from that init with train_ct.py's loop; every
other flag is train_ct.py's.

python -m results.l2_grip [--dataset cifar100] [--log-snr-init 2] [--gain 1]       (~1 min on 2 cores)
python -m results.l2_grip --gain 2.449 --train --dataset cifar100 --epochs 4 ...    (a train_ct.py run)
"""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import noprop
import train_ct
from harness import cli, data, loop, variants


def scale_weights(params, gain):
    """Every weight matrix ("W") of the model and the classifier times gain; biases and the schedule as they are."""
    scale = lambda tree: jax.tree_util.tree_map_with_path(lambda p, w: gain * w if p[-1].key == "W" else w, tree)
    return {**params, "model": scale(params["model"]), "classifier": scale(params["classifier"])}


def grip(grad_fn, params, batches, weight_decay):
    """{layer: (RMS data gradient, weight_decay x RMS w, share of coordinates whose gradient RMS < weight_decay |w|)}
    over the weight matrices of params["model"]; grad_fn(params, batch) -> a gradient pytree like params."""
    sq = None
    for b in batches:
        g = jax.tree.map(jnp.square, grad_fn(params, b)["model"])
        sq = g if sq is None else jax.tree.map(jnp.add, sq, g)
    out = {}
    for (path, w), s in zip(jax.tree_util.tree_leaves_with_path(params["model"]), jax.tree.leaves(sq)):
        if path[-1].key == "W":
            ms = s / len(batches)  # each coordinate's mean square data gradient
            out[jax.tree_util.keystr(path[:-1])] = (float(jnp.sqrt(jnp.mean(ms))), weight_decay * float(jnp.sqrt(jnp.mean(w ** 2))),
                                                    float(jnp.mean(jnp.sqrt(ms) < weight_decay * jnp.abs(w))))
    return out


def table(dataset, log_snr_init, gain, weight_decay=1e-3, n=20, seed=0):
    x, y, _, _ = data.load_dataset(dataset)
    m = data.DATASETS[dataset][1]
    params, state = noprop.init_ct(jax.random.PRNGKey(seed), x.shape[1:], m, log_snr_init=log_snr_init)
    params = scale_weights(params, gain)
    loss = jax.jit(jax.grad(lambda p, b: noprop.loss_ct(p, state, b[0], b[1], b[2])[0]))
    rng = np.random.default_rng(seed)
    batches = [(jax.random.PRNGKey(i), x[idx], y[idx]) for i, idx in
               enumerate(rng.choice(len(x), 128, replace=False) for _ in range(n))]
    print(f"CT at init, {dataset}, log SNR from -{log_snr_init} to +{log_snr_init}, weights x {gain}:")
    for layer, (g, l2, share) in grip(loss, params, batches, weight_decay).items():
        print(f"  {layer:18s} data gradient {g:.2e}   {weight_decay} |w| {l2:.2e}   ratio {g / l2:7.2f}   "
              f"under the decay {100 * share:3.0f} %")


def train(gain, argv):
    """train_ct.main with the init's weights times gain."""
    args = cli.parse_args(train_ct.DEFAULTS, __doc__, argv, {"noprop": "ct"})
    x_tr, y_tr, x_te, y_te = data.prepare_data(args)
    (image_shape, m), (k_init, k_run) = data.DATASETS[args.dataset], jax.random.split(jax.random.PRNGKey(args.seed))
    v = variants.from_args(args)
    params, state = v.init(k_init, image_shape, m, args.embedding, x_tr, y_tr)
    print(f"every weight matrix of the init x {gain}")
    loop.fit(args, v, scale_weights(params, gain), state, (x_tr, y_tr, x_te, y_te), k_run)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar100", choices=["mnist", "cifar10", "cifar100"])
    p.add_argument("--log-snr-init", type=float, default=noprop.LOG_SNR_INIT)
    p.add_argument("--gain", type=float, default=1.0)
    p.add_argument("--train", action="store_true", help="train CT from this init; the other flags are train_ct.py's")
    a, rest = p.parse_known_args()
    if a.train:
        train(a.gain, rest + ["--dataset", a.dataset, "--log-snr-init", str(a.log_snr_init)])
    elif rest:
        sys.exit(f"unknown flags {' '.join(rest)} (train_ct.py's flags go with --train)")
    else:
        table(a.dataset, a.log_snr_init, a.gain)
