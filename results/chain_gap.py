"""Where along Eq. 3's chain does its noise cost a trained NoProp-DT accuracy?

python results/chain_gap.py CHECKPOINT.npz --limit 2000 > results/NAME_chain_gap.log

For each step t it prints the accuracy of block t's own prediction (argmax of its logits)
on three inputs z_{t-1}: a sample of q(z_{t-1}|y) as in training (Eq. 6, which uses the
label), the deterministic chain (Eq. 3 without eps) and the stochastic chain (Eq. 3); then
the final accuracy of both chains, split by how confident block 1 is (from pure noise, block 1
is a classifier of the image alone).
"""
import argparse, functools, os, sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import noprop  # noqa: E402
from harness.data import default_data_dir  # noqa: E402
from viz.trajectories import block_logits, chain  # noqa: E402


@functools.partial(jax.jit, static_argnames="block")
def q_logits(params, state, key, x, y, sched, block="cnn"):
    """Every block's logits on z_{t-1} ~ q(z_{t-1}|y), the input it was trained on (Eq. 8)."""
    u = noprop.class_embeddings(params)[y]
    keys = jax.random.split(key, sched["a"].shape[0])
    zs = jax.vmap(noprop.sample_q, (0, None, 0))(keys, u, sched["alpha_bar"][:-1, None, None])
    return block_logits(params, state, x, zs, block)


def main(argv=None):
    from viz.figures import restore
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--limit", type=int, default=2000, help="first N test images")
    p.add_argument("--runs", type=int, default=3, help="stochastic chains")
    a = p.parse_args(argv)
    meta, _, tree, T, (_, _, x_te, y_te) = restore(a.checkpoint, a.data_dir)
    if meta["variant"] != "dt":
        sys.exit(f"error: {a.checkpoint} is a {meta['variant']} checkpoint; this is for NoProp-DT")
    params, state, x, y = tree["eval"], tree["state"], x_te[:a.limit], np.asarray(y_te[:a.limit])
    sched, key, block, classify = noprop.cosine_schedule(T), jax.random.PRNGKey(0), meta["args"]["block"], \
        noprop.CLASSIFIERS[meta["args"]["classifier"]]
    acc = lambda logits: 100 * np.mean(np.argmax(logits, -1) == y, -1)
    print(f"NoProp-DT {meta['dataset']} {meta['embedding']}, {len(meta['history'])} epochs, first {len(y)} test images")
    print(f"{'block t accuracy (%) on its input':36s}" + "".join(f"{t:6d}" for t in range(1, T + 1)) + "  final")
    print(f"{'z_(t-1) ~ q(z_(t-1)|y), as trained':36s}" + "".join(f"{v:6.1f}" for v in acc(q_logits(params, state, key, x, y, sched, block))))
    finals, conf = {}, None
    for name, stochastic, runs in (("deterministic chain", False, 1), (f"stochastic chain ({a.runs} runs)", True, a.runs)):
        out = [chain("dt", params, state, jax.random.fold_in(key, r), x, T, stochastic, block) for r in range(runs)]
        finals[stochastic] = np.stack([np.argmax(classify(params, zT), -1) == y for zT, _, _ in out])
        conf = np.asarray(jax.nn.softmax(out[0][2][0]).max(-1)) if conf is None else conf
        print(f"{name:36s}" + "".join(f"{v:6.1f}" for v in np.mean([acc(lg) for _, _, lg in out], 0))
              + f"{100 * finals[stochastic].mean():7.1f}")
    sure = conf > 0.9
    for label, rows in ((f"block 1 confident (> 0.9), {100 * sure.mean():.0f} % of images", sure),
                        ("block 1 unsure (<= 0.9)", ~sure)):
        if not rows.any():
            continue
        print(f"{label}: final accuracy {100 * finals[False][:, rows].mean():.1f} % deterministic, "
              f"{100 * finals[True][:, rows].mean():.1f} % stochastic")


if __name__ == "__main__":
    main()
