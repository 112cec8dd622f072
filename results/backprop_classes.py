"""Per-class test recall of the backprop baseline's checkpoint (README, Results).

python results/backprop_classes.py /work/ckpt/backprop_mnist_onehot_s0/checkpoint.npz ../shared/data
"""
import os, sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import noprop  # noqa: E402
from viz import figures  # noqa: E402

ckpt, data_dir = sys.argv[1:3]
meta, _, tree, _, _ = figures.restore(ckpt, data_dir)
x_tr, y_tr, x_te, y_te = noprop.load_dataset(meta["dataset"], data_dir)
m = noprop.DATASETS[meta["dataset"]][1]
predict = jax.jit(noprop.predict_backprop)
for name, x, y in (("test", x_te, y_te), ("train, first 10,000", x_tr[:10000], y_tr[:10000])):
    p = np.concatenate([predict(tree["params"], tree["state"], jax.random.PRNGKey(0), x[i:i + noprop.EVAL_CHUNK])
                        for i in range(0, len(x), noprop.EVAL_CHUNK)])
    print(f"{name}: accuracy {100 * np.mean(p == y):.2f} %, predicted class counts {np.bincount(p, minlength=m).tolist()}")
    print("  recall per class: " + ", ".join(f"{c}: {100 * np.mean(p[y == c] == c):.1f}" for c in range(m)))
a = np.tanh(np.asarray(tree["params"]["w"]))
print(f"a_t = tanh(w_t): {' '.join(f'{v:.3f}' for v in a)}; prod(1 - a_t) = {np.prod(1 - a):.1e} (z_0's weight in z_T)")
