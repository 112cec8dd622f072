"""Bytes that cross between devices (or processes) in one training step, read off the compiled
step on a 2-device mesh with the scripts' own shardings (harness.processes.place).

python -m bench.collectives     # MNIST shapes, batch 128, T = 10; writes results/collectives.json

Two simulated CPU devices stand for two processes: the shardings, and so the collectives XLA
inserts, are the same. Counted: the result size of every all-reduce, all-gather, reduce-scatter,
all-to-all and collective-permute in the step (what each device receives, before the
collective algorithm's own overhead).
"""
import math
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import functools  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import noprop  # noqa: E402
from harness import loop, processes, variants  # noqa: E402

BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "f16": 2, "bf16": 2, "u8": 1, "s64": 8, "f64": 8}


def collective_bytes(hlo):
    """Sum of the result sizes of the collectives in an HLO module's text, by kind."""
    out = {}
    hlo = re.sub(r"/\*.*?\*/", "", hlo)  # /*index=5*/ comments inside tuples
    for m in re.finditer(r"= \(?([^=]*?)\)? (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(", hlo):
        size = sum(BYTES[t] * math.prod(int(n) for n in d.split(",") if n)
                   for t, d in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))
        out[m.group(2)] = out.get(m.group(2), 0) + size
    return out


def main():
    key, shape, m, B, T = jax.random.PRNGKey(0), (28, 28, 1), 10, 128, 10
    x, y = jax.random.uniform(key, (B,) + shape), jax.random.randint(key, (B,), 0, m)
    rows = {}
    for variant in ("dt", "ct"):  # the two layouts: DT's blocks split over devices, CT's batch (so FM's and backprop's)
        v = variants.dt(T) if variant == "dt" else variants.ct()
        (params, state), loss, opt = v.init(key, shape, m), v.loss, v.optimizer
        tree, batch = processes.place({"params": params, "state": state, "opt_state": opt.init(params)}, variant, 2)
        step = jax.jit(functools.partial(noprop.train_step, loss_fn=loss, optimizer=opt))
        args = (tree["params"], tree["state"], tree["opt_state"], key, *jax.device_put((x, y), batch))
        rows[variant] = collective_bytes(step.lower(*args).compile().as_text())
        print(f"{variant}: {sum(rows[variant].values()):,} bytes per step ({rows[variant]}); "
              f"parameters {4 * noprop.count_params(params):,} bytes")
    return loop.write_json(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "collectives.json"), rows)


if __name__ == "__main__":
    main()
