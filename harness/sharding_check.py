"""Run by harness/test_processes.py on 2 simulated CPU devices: one training step's loss, BN state and
gradients with the scripts' shardings (DT's blocks split, CT's batch split) equal the single-device step.

XLA_FLAGS=--xla_force_host_platform_device_count=2 python harness/sharding_check.py
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import processes, variants  # noqa: E402

assert jax.device_count() == 2
key, shape = jax.random.PRNGKey(0), (16, 16, 1)
x, y = jax.random.uniform(key, (8,) + shape), jnp.arange(8) % 10
for variant in ("dt", "ct"):
    v = variants.dt(T=2) if variant == "dt" else variants.ct()
    (params, state), loss = v.init(key, shape, 10, "onehot" if variant == "dt" else "dim20"), v.loss
    # the step's math is loss, new BN state and gradients (the optimiser update is elementwise)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ref = grad(params, state, key, x, y)
    placed, batch = processes.place({"params": params, "state": state}, variant, 2)
    out = grad(placed["params"], placed["state"], key, *jax.device_put((x, y), batch))
    split = out[1]["blocks"]["out"]["W"] if variant == "dt" else placed["params"]["model"]["out"]["W"]
    assert len(split.sharding.device_set) == 2
    if variant == "dt":  # each device holds (and trains) one of the two blocks
        assert [s.data.shape[0] for s in split.addressable_shards] == [1, 1]
    # float tolerance (summation order differs across devices), on the scale of all gradients:
    # biases that feed batch norm have gradient 0 in exact math and +-1e-6 of noise here
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref[1]))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4 * scale)
print("sharded == single-device")
