"""Does a trained NoProp-CT model use the image? Read its checkpoint and print, on 2,000 test images:

- per t, how often argmax u_hat(z_t, x, t) is the label with the right images and with the images shuffled
  (equal: the image path has no effect), beside argmax z_t itself (what z_t alone gives away);
- each image-path weight's norm against its norm at init (near 0: weight decay has emptied the path).

python -m results.ct_image_use CKPT/checkpoint.npz [CKPT2 ...]   (seconds a checkpoint on 2 cores)
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import noprop
from harness.data import default_data_dir
from viz.figures import restore


def report(checkpoint, n=2000):
    meta, init, tree, _, data = restore(checkpoint, default_data_dir())
    p = tree["eval"]  # the weights the run evaluated (its moving average)
    x, y = data[2][:n], data[3][:n]
    model, W = p["model"], noprop.class_embeddings(p)
    feats = jnp.concatenate([jax.jit(noprop.continuous_features)(model, x[i:i + 500]) for i in range(0, n, 500)])
    shuffled = feats[np.random.default_rng(0).permutation(n)]
    args = meta["args"]
    print(f"{meta['dataset']}, {len(meta['history'])} epochs, --weight-decay {args['weight_decay']} "
          f"--schedule {args.get('schedule', 'learned')} --label-scale {args.get('label_scale', 1.0)}")
    for t in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        tt = jnp.full((n,), t)
        z = noprop.sample_q(jax.random.PRNGKey(1), W[y], noprop.alpha_bar_ct(p["schedule"], tt)[:, None])
        acc = [float((noprop.continuous_logits(model, f, z, tt, x.shape[1:]).argmax(-1) == y).mean())
               for f in (feats, shuffled)]
        print(f"  t = {t:.2f}: u_hat right {100 * acc[0]:5.1f} %, images shuffled {100 * acc[1]:5.1f} %, "
              f"argmax z_t {100 * float((z.argmax(-1) == y).mean()):5.1f} %")
    for (path, w), w0 in zip(jax.tree_util.tree_leaves_with_path(model["img"]), jax.tree.leaves(init["model"]["img"])):
        print(f"  image path {jax.tree_util.keystr(path):14s} norm {float(jnp.linalg.norm(w)):7.3f}, "
              f"at init {float(jnp.linalg.norm(w0)):6.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for ckpt in sys.argv[1:]:
        report(ckpt)
