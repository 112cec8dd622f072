"""Does NoProp-CT's denoiser leave its flat start on CIFAR-100 (one-hot), and does the label path's init decide it?

At init u_hat(z_t, x, t) = softmax(logits) @ W_embed is nearly the uniform mean embedding, whose Eq. 9 term is
E_t[SNR'(t)] (1 - 1/m) / 2 = (SNR(1) - SNR(0)) (1 - 1/m) / 2. The ratio of the logged term to that value is
1 while the model ignores z_t and x, and falls as it learns to read them. This trains the paper's CT (schedule
fixed at its init, so the denominator stays put) on the first 12,800 training images and prints the ratio,
averaged over windows of 200 steps, for the label path's init weights as they are (PyTorch's default,
U(+-1/sqrt(d))) and scaled up: a one-hot z_t gives that path features of size 1/sqrt(d), 0.1 for d = 100.

python -m results.ct_flat_start [--steps 1000] [--scales 1,10] [--classes 100]   (--label-scale of train_ct.py)   (~4 min a scale on 2 cores)
"""
import argparse
from functools import partial

import jax
import numpy as np

import noprop
from harness import data, variants


def ratios(x, y, m, scale, steps, window=200, seed=0):
    v = variants.ct(schedule="fixed", label_scale=scale)
    params, state = v.init(jax.random.PRNGKey(seed), x.shape[1:], m, "onehot", x, y)
    ab = noprop.alpha_bar_ct(params["schedule"], np.array([0.0, 1.0]))
    flat = 0.5 * (1 - 1 / m) * float(ab[1] / (1 - ab[1]) - ab[0] / (1 - ab[0]))
    step = jax.jit(partial(noprop.train_step, loss_fn=v.loss, optimizer=v.optimizer))
    opt_state, key, out, acc = v.optimizer.init(params), jax.random.PRNGKey(seed + 1), [], []
    for i in range(steps):
        key, k = jax.random.split(key)
        b = jax.random.randint(k, (128,), 0, x.shape[0])
        params, state, opt_state, _, aux = step(params, state, opt_state, k, x[b], y[b])
        acc.append(float(aux["sdm"]) / flat)
        if len(acc) == window:
            out.append(float(np.mean(acc)))
            acc = []
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--scales", default="1,10")
    p.add_argument("--classes", type=int, default=100, choices=(10, 100), help="CIFAR-100 or CIFAR-10")
    a = p.parse_args()
    name = {100: "cifar100", 10: "cifar10"}[a.classes]
    x_tr, y_tr, _, _ = data.load_dataset(name, offline=True)
    x, y = jax.numpy.asarray(x_tr[:12800]), jax.numpy.asarray(y_tr[:12800])
    for s in map(float, a.scales.split(",")):
        r = ratios(x, y, a.classes, s, a.steps)
        print(f"{name}, label-path init x{s:g}: Eq. 9 term / flat value per 200 steps: "
              + " ".join(f"{v:.2f}" for v in r), flush=True)
