"""The chain at work: z_0 .. z_T of test images under Eq. 3, projected to 2-D and coloured by class,
deterministic and stochastic side by side, with the accuracy of each block's own guess along the chain.

  python -m viz.trajectories CHECKPOINT.npz --out results/figures/dt_mnist_onehot_trajectories.png

For NoProp-DT (the T blocks) and NoProp-CT (its inference grid). The plane is the linear map that puts
the class embeddings u_y on the corners of a regular polygon: a chain that ends at its label ends there.
matplotlib is optional: nothing else in noprop needs it (pip install matplotlib).
"""
import argparse, functools, os, sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import noprop  # noqa: E402
from harness import variants  # noqa: E402
from harness.data import default_data_dir  # noqa: E402


def block_logits(params, state, x, zs, block="cnn"):
    """Logits (T, B, m) of DT block t (variants.BLOCKS[block]) on input zs[t-1], for every t."""
    return jax.lax.map(lambda a: variants.BLOCKS[block][1](a[0], a[1], x, a[2])[0], (params["blocks"], state, zs))


@functools.partial(jax.jit, static_argnames=("variant", "T", "stochastic", "block"))
def chain(variant, params, state, key, x, T, stochastic, block="cnn"):
    """predict_dt's or predict_ct's chain (same key, same z): (z_T, the path z_0 .. z_T, logits (T, B, m)
    of each block's guess of y on its input z_{t-1}). T: DT's blocks, or CT's grid steps."""
    if variant == "dt":
        zT, path = noprop.dt_chain(params, state, key, x, noprop.cosine_schedule(T), stochastic, variants.BLOCKS[block])
        guess = block_logits(params, state, x, path[:-1], block)
    else:  # CT: the model at grid time t_{k-1} on z_{k-1}, as ct_chain evaluates it
        zT, path = noprop.ct_chain(params, key, x, T, "stochastic" if stochastic else "deterministic")
        feats, t = noprop.continuous_features(params["model"], x), jnp.arange(T) / T
        guess = jax.lax.map(lambda a: noprop.continuous_logits(params["model"], feats, a[0], a[1][None], x.shape[1:]),
                            (path[:-1], t))
    return zT, path, guess


def trajectories(variant, params, state, key, x, y, T, runs=3, block="cnn", classifier="softmax"):
    """Everything the figure shows, for both chains: paths, per-block accuracy, final accuracy (p(y|z_T) on z_T)."""
    out = {}
    for stochastic in (False, True):
        keys = [jax.random.fold_in(key, r) for r in range(runs if stochastic else 1)]
        results = [chain(variant, params, state, k, x, T, stochastic, block) for k in keys]
        final = [np.mean(np.argmax(noprop.CLASSIFIERS[classifier](params, zT), -1) == y) for zT, _, _ in results]
        out[stochastic] = {"path": np.asarray(results[0][1]), "final": float(np.mean(final)),
                           "block_acc": np.mean([np.mean(np.argmax(g, -1) == y, -1) for _, _, g in results], 0)}
    return out


def plane(W):
    """(centre, P (d, 2)): the linear map z -> (z - centre) P that puts class embedding u_k on the k-th vertex of
    a regular m-gon (least squares through the centred W_embed), so each class ends at a place of its own."""
    W = np.asarray(W, np.float64)
    angles = 2 * np.pi * np.arange(W.shape[0]) / W.shape[0]
    centre = W.mean(0)
    return centre, np.linalg.pinv(W - centre) @ np.stack([np.cos(angles), np.sin(angles)], 1)


def figure(plt, out, y, W, title, shown=60):
    """Three panels: the deterministic and the stochastic chain's paths of `shown` images, and accuracy along t."""
    centre, axes2 = plane(W)
    fig, panels = plt.subplots(1, 3, figsize=(13, 4))
    colours = plt.get_cmap("tab10" if W.shape[0] <= 10 else "tab20")
    T = out[False]["path"].shape[0] - 1
    every = max(1, T // 50)  # CT's 1000 grid steps: plot 50 or so of them
    for ax, stochastic in zip(panels[:2], (False, True)):
        path = (out[stochastic]["path"][::every, :shown] - centre) @ axes2  # (steps, images, 2)
        for i in range(path.shape[1]):
            c = colours(int(y[i]) % colours.N)
            ax.plot(path[:, i, 0], path[:, i, 1], "-", color=c, alpha=0.3 if stochastic else 0.5, lw=0.8)
            ax.plot(path[-1, i, 0], path[-1, i, 1], "o", color=c, ms=3)
        u = (np.asarray(W) - centre) @ axes2  # the class embeddings u_y, where the chains should end
        for k, (a, b) in enumerate(u[:10]):
            ax.text(a, b, str(k), fontsize=9, weight="bold", ha="center", va="center",
                    bbox={"boxstyle": "circle,pad=0.15", "fc": "white", "ec": colours(k % colours.N)})
        ax.set(title=f"{'stochastic' if stochastic else 'deterministic'} Eq. 3: "
                     f"{100 * out[stochastic]['final']:.1f} % correct", xticks=[], yticks=[],
               xlim=(-1.8, 1.8), ylim=(-1.8, 1.8), aspect="equal")  # the polygon; z_0's noise starts further out
    ax = panels[2]
    for stochastic, style in ((False, "o-"), (True, "s--")):
        acc = out[stochastic]["block_acc"]
        ax.plot(np.arange(1, len(acc) + 1), 100 * acc, style, ms=3, label="stochastic" if stochastic else "deterministic")
    ax.set(xlabel="block t (its guess of y from x and z_{t-1})", ylabel="accuracy (%)", ylim=(0, 100))
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv=None):
    from viz.figures import NAMES, restore
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--out", required=True, help="the .png to write")
    p.add_argument("--limit", type=int, default=1000, help="first N test images for the accuracies (60 are drawn)")
    a = p.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: viz.trajectories needs matplotlib (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meta, _, tree, T, (_, _, x_te, y_te) = restore(a.checkpoint, a.data_dir)
    if meta["variant"] not in ("dt", "ct"):
        sys.exit(f"error: {a.checkpoint} is a {meta['variant']} checkpoint; the chain of Eq. 3 is NoProp-DT's or -CT's")
    run = meta["args"]
    T = T if meta["variant"] == "dt" else run["steps"]
    x, y = x_te[:a.limit], np.asarray(y_te[:a.limit])
    out = trajectories(meta["variant"], tree["eval"], tree["state"], jax.random.PRNGKey(0), x, y, T, block=run["block"],
                       classifier=run["classifier"])  # restore fills in the defaults: CT's runs have no --classifier
    epochs = len(meta["history"])
    title = (f"{NAMES[meta['variant']]} {meta['dataset']} {meta['embedding']}, {epochs} epoch{'s' * (epochs != 1)}: "
             f"first {len(y)} test images")
    fig = figure(plt, out, y, noprop.class_embeddings(tree["eval"]), title)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
