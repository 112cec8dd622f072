"""Two levers on the unrolled DT step, A/B in one process (MNIST shapes, batch 128, T = 10).

python -m bench.levers > results/levers_unrolled.log

one_conv1: the T first convs as one 1 -> 32T conv over x's im2col, split per block (same loss).
dropout16: dropout masks from 16-bit random bits (half the threefry work; other masks, other numbers).
Four alternating rounds of 5 steps each; medians in ms.
"""
import functools, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax, jax.numpy as jnp, numpy as np, optax
import noprop
from harness import loop

shape, m, B, T = (28, 28, 1), 10, 128, 10
key = jax.random.PRNGKey(0)
x, y = jax.random.uniform(key, (B,) + shape), jax.random.randint(key, (B,), 0, m)
params, state = noprop.init_dt(key, shape, m, T=T)
sched = noprop.cosine_schedule(T)
opt = optax.adamw(1e-3, weight_decay=1e-3)
orig_dropout, orig_conv_stack = noprop.dropout, noprop.conv_stack

def dropout16(key, x, rate=noprop.DROPOUT):
    if key is None:
        return x
    keep = jax.random.bits(key, x.shape, jnp.uint16) < jnp.uint16(round((1 - rate) * 65536))
    return jnp.where(keep, x / (1.0 - rate), 0.0)

def conv_stack_pre(p, x, key=None):
    if "pre1" not in p:
        return orig_conv_stack(p, x, key)
    k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None,) * 3
    h = noprop.dropout(k1, jax.nn.relu(noprop.maxpool2(p["pre1"])))
    h = noprop.dropout(k2, jax.nn.relu(noprop.conv3x3(p["conv2"], h)))
    h = noprop.dropout(k3, jax.nn.relu(noprop.maxpool2(noprop.conv3x3(p["conv3"], h))))
    return noprop.dense(p["fc"], h.reshape(h.shape[0], -1))

def loss_onecv(params, state, key, x, y, sched):
    c1 = params["blocks"]["img"]["conv1"]            # W (T,3,3,1,32), b (T,32)
    W = jnp.moveaxis(c1["W"], 0, -2).reshape(3, 3, 1, T * 32)
    h1 = noprop.conv3x3({"W": W, "b": c1["b"].reshape(-1)}, x)  # (B,26,26,T*32)
    h1 = jnp.moveaxis(h1.reshape(h1.shape[:-1] + (T, 32)), -2, 0)
    blocks = dict(params["blocks"]); blocks["img"] = dict(blocks["img"]); blocks["img"]["pre1"] = h1
    return noprop.loss_dt({**params, "blocks": blocks}, state, key, x, y, sched, block_axis="unroll")

def build(name):
    noprop.dropout = dropout16 if name == "dropout16" else orig_dropout
    noprop.conv_stack = conv_stack_pre if name == "one_conv1" else orig_conv_stack
    loss = loss_onecv if name == "one_conv1" else functools.partial(noprop.loss_dt, block_axis="unroll")
    loss = functools.partial(loss, sched=sched)
    args = (params, state, opt.init(params), key, x, y)
    c = loop.jit_step(loss, opt).lower(*args).compile()
    out = c(*args); jax.block_until_ready(out)
    return c, args, float(out[3])

names = ["base", "one_conv1", "dropout16"]
steps = {n: build(n) for n in names}
for n in names: print(n, "first-step loss", steps[n][2], flush=True)
res = {n: [] for n in names}
for r in range(4):
    for n in names:
        c, args, _ = steps[n]
        ts = []
        for _ in range(5):
            t0 = time.perf_counter(); jax.block_until_ready(c(*args)); ts.append(time.perf_counter() - t0)
        res[n].append(1000 * float(np.median(ts)))
    print("round", r, {n: round(res[n][-1]) for n in names}, flush=True)
print({n: (round(float(np.median(v))), [round(t) for t in v]) for n, v in res.items()})
