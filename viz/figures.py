"""Figures of a run: learning curves, the noise schedule, learned prototype embeddings.

Written by `--plot` at the end of training, or afterwards from a checkpoint:
  python -m viz.figures CHECKPOINT.npz --out-dir results/figures
matplotlib is optional: nothing else in noprop needs it (pip install matplotlib).
"""
import argparse, json, os, sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import noprop  # noqa: E402
from harness import loop, variants  # noqa: E402
from harness.checkpoint import load_checkpoint  # noqa: E402
from harness.data import DATASETS, default_data_dir, load_dataset  # noqa: E402


NAMES = {"dt": "NoProp-DT", "ct": "NoProp-CT", "fm": "NoProp-FM", "backprop": "Backprop", "adjoint": "Adjoint"}


def write(history, variant, image_shape, params_before, params_after, T, stem):
    """Write {stem}_curves.png, {stem}_schedule.png (DT, CT) and {stem}_embeddings.png (prototype). Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = {"curves": curves(plt, history, variant)}
    if variant in ("dt", "ct"):
        figs["schedule"] = schedule(plt, variant, T, params_before, params_after)
    if "W_embed" in params_after and noprop.z_is_image(image_shape, params_after["W_embed"].shape[1]):
        figs["embeddings"] = embeddings(plt, image_shape, params_before, params_after)
    for name, fig in figs.items():
        fig.tight_layout()
        fig.savefig(f"{stem}_{name}.png", dpi=110)
        plt.close(fig)
    return [f"{stem}_{name}.png" for name in figs]


def curves(plt, history, variant):
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    a1.plot(epochs, [h["loss"] for h in history], "o-")
    a1.set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log")
    a2.plot(epochs, [100 * h["test_acc"] for h in history], "o-")
    a2.set(xlabel="epoch", ylabel="test accuracy (%)")
    fig.suptitle(f"{NAMES[variant]} learning curves")
    return fig


def schedule(plt, variant, T, params_before, params_after):
    """alpha_bar and SNR against t: DT's fixed cosine, or CT's learned schedule before and after training."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    if variant == "dt":
        s, t = noprop.cosine_schedule(T), np.arange(T + 1) / T
        lines = [("fixed cosine, t/T", np.asarray(s["alpha_bar"]), "o-")]
    else:
        t = jnp.linspace(0, 1, 201)
        lines = [(name, np.asarray(noprop.alpha_bar_ct(p["schedule"], t)), style)
                 for name, p, style in (("before training", params_before, "--"), ("after", params_after, "-"))]
    for name, ab, style in lines:
        a1.plot(t, ab, style, label=name)
        a2.plot(t, ab / (1 - ab), style, label=name)
    a1.set(xlabel="t (0: noise, 1: label)", ylabel="alpha_bar(t)")
    a2.set(xlabel="t", ylabel="SNR(t)", yscale="log")
    a1.legend()
    fig.suptitle(f"NoProp-{variant.upper()} noise schedule")
    return fig


def embeddings(plt, image_shape, params_before, params_after):
    """Prototype class embeddings as images: their init (class medoids) above, learned below."""
    m = params_after["W_embed"].shape[0]
    fig, axes = plt.subplots(2, m, figsize=(1.1 * m, 2.6), squeeze=False)
    for r, (name, p) in enumerate([("init (class medoids)", params_before), ("learned", params_after)]):
        for c in range(m):
            img = np.asarray(p["W_embed"][c]).reshape(image_shape)
            axes[r, c].imshow(img.squeeze(-1) if image_shape[-1] == 1 else np.clip(img, 0, 1), cmap="gray")
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("prototype class embeddings (paper Fig. 2 / v2 Fig. 3)")
    return fig


def plot_run(args, params_before, record, tree):
    """The end of a script: with --plot, the run's figures next to its --out JSON. Returns (record, tree)."""
    if args.plot and jax.process_index() == 0:  # several processes: process 0 draws
        stem = os.path.splitext(args.out)[0] if args.out else f"{args.variant}_{args.dataset}_{args.embedding}"
        after = loop.eval_weights(tree, getattr(args, "ema", 0))
        for path in write(record["history"], args.variant, DATASETS[args.dataset][0], params_before, after,
                          getattr(args, "T", 1), stem):
            print(f"wrote {path}")
    return record, tree


def restore(checkpoint, data_dir):
    """A run as the scripts built it, from its checkpoint: (meta, initial params, trained tree, T, data).

    tree["eval"] holds the weights the run evaluated: the moving average where it kept one.

    The initial parameters come from the seed (the scripts' init key), the variants table and the
    training data (prototype medoids); load_checkpoint then checks every array against them.
    """
    with np.load(checkpoint, allow_pickle=False) as f:
        meta = json.loads(str(f["__meta__"]))
        ema = [k for k in f.files if k.endswith(".ema['classifier']['b']")]
    # the run's flags (checkpoints of older versions lack them: the defaults, and T = 10)
    meta["args"] = {"T": 10, "block": "cnn", "classifier": "softmax", "steps": 1000, **meta.get("args", {})}
    T = meta["args"]["T"]
    shape, m = DATASETS[meta["dataset"]]
    data = load_dataset(meta["dataset"], data_dir, offline=True)
    x, y = data[:2]
    if meta.get("train_limit"):
        x, y = x[:meta["train_limit"]], y[:meta["train_limit"]]
    k_init = jax.random.split(jax.random.PRNGKey(meta["seed"]))[0]  # the scripts' init key
    v = variants.from_args({**meta["args"], "variant": meta["variant"]})  # the run's own optimiser (e.g. --clip 0)
    params, state = v.init(k_init, shape, m, meta["embedding"], x, y)
    opt = loop.with_ema(v.optimizer, 0.999 if ema else 0)  # the run evaluated a moving average (loop.track_ema)
    template = {"params": params, "state": state, "opt_state": opt.init(params)}
    tree, _ = load_checkpoint(checkpoint, template, {k: meta[k] for k in ("variant", "dataset", "embedding")})
    tree["eval"] = loop.eval_weights(tree, ema)
    return meta, params, tree, T, data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=default_data_dir(), help="for the prototype embeddings' initial medoids")
    p.add_argument("--out-dir", default="results/figures")
    a = p.parse_args(argv)
    meta, params, tree, T, _ = restore(a.checkpoint, a.data_dir)
    variant, shape = meta["variant"], DATASETS[meta["dataset"]][0]
    os.makedirs(a.out_dir, exist_ok=True)
    stem = os.path.join(a.out_dir, f"{variant}_{meta['dataset']}_{meta['embedding']}")
    for path in write(meta["history"], variant, shape, params, tree["eval"], T, stem):
        print(path)


if __name__ == "__main__":
    main()
