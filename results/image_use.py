"""Does a trained NoProp-CT or NoProp-FM model use the image? Read its checkpoint and print, on 2,000 test images:

- per t, how often the model's guess of the label from z_t is right with the right images and with the images
  shuffled (equal: the image path has no effect), beside z_t's nearest class alone (what z_t gives away).
  The guess: CT argmax u_hat(z_t, x, t), z_t ~ q(z_t|y) (Eq. 6); FM the nearest embedding to Eq. 12's
  z~_1 = z_t + (1 - t) v(z_t, x, t), z_t on Eq. 10's path from z_0 ~ N(0, I);
- each image-path weight's norm against its norm at init (near 0: weight decay has emptied the path).

python -m results.image_use CKPT/checkpoint.npz [CKPT2 ...]   (seconds a checkpoint on 2 cores)
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import noprop
from harness.data import default_data_dir
from viz.figures import restore


def guesses(variant, p, feats, y, t, image_shape):
    """(the model's guess of y from z_t given image features, z_t's nearest class) at one t for the batch."""
    W, model, tt = noprop.class_embeddings(p), p["model"], jnp.full((len(y),), t)
    if variant == "ct":
        z = noprop.sample_q(jax.random.PRNGKey(1), W[y], noprop.alpha_bar_ct(p["schedule"], tt)[:, None])
        u_hat = lambda f: noprop.continuous_logits(model, f, z, tt, image_shape).argmax(-1)
        return u_hat, noprop.nearest_embedding(z, W)
    z = t * W[y] + (1 - t) * jax.random.normal(jax.random.PRNGKey(1), (len(y), W.shape[1]))
    v = lambda f: noprop.flow(model, f, W, image_shape)(t, z)  # FM's velocity, as its inference reads it
    return lambda f: noprop.nearest_embedding(z + (1 - t) * v(f), W), noprop.nearest_embedding(z, W)


def report(checkpoint, n=2000):
    meta, init, tree, _, data = restore(checkpoint, default_data_dir())
    if meta["variant"] not in ("ct", "fm"):
        sys.exit(f"{checkpoint}: a {meta['variant']} run; this reads NoProp-CT and NoProp-FM checkpoints")
    p = tree["eval"]  # the weights the run evaluated (its moving average)
    x, y = data[2][:n], data[3][:n]
    model = p["model"]
    feats = jnp.concatenate([jax.jit(noprop.continuous_features)(model, x[i:i + 500]) for i in range(0, n, 500)])
    shuffled = feats[np.random.default_rng(0).permutation(n)]
    args = meta["args"]
    print(f"{meta['variant']} {meta['dataset']}, {len(meta['history'])} epochs, --weight-decay {args['weight_decay']}"
          + (f" --schedule {args.get('schedule', 'learned')}" if meta["variant"] == "ct" else "")
          + f" --label-scale {args.get('label_scale', 1.0)}")
    for t in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        guess, nearest = guesses(meta["variant"], p, feats, y, t, x.shape[1:])
        acc = [float((guess(f) == y).mean()) for f in (feats, shuffled)]
        print(f"  t = {t:.2f}: model right {100 * acc[0]:5.1f} %, images shuffled {100 * acc[1]:5.1f} %, "
              f"nearest to z_t {100 * float((nearest == y).mean()):5.1f} %")
    for (path, w), w0 in zip(jax.tree_util.tree_leaves_with_path(model["img"]), jax.tree.leaves(init["model"]["img"])):
        print(f"  image path {jax.tree_util.keystr(path):14s} norm {float(jnp.linalg.norm(w)):7.3f}, "
              f"at init {float(jnp.linalg.norm(w0)):6.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for ckpt in sys.argv[1:]:
        report(ckpt)
