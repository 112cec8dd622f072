"""Many devices and many processes (harness.processes): each check runs a program of its own
(harness/sharding_check.py, harness/processes_check.py) in a fresh process."""
import json
import os

import numpy as np
import pytest

from harness.testing import FAST_COMPILE, TMP

pytest_plugins = ["harness.testing"]


@pytest.mark.subprocess("processes", ["harness/processes_check.py", TMP], env={"XLA_FLAGS": FAST_COMPILE})
def test_processes_train_as_one_program_equal_to_a_single_process(subprocess_result):
    """jax.distributed on 127.0.0.1: 2 processes of train_dt.py (the blocks split between them; started as
    mpirun would, resumed half way) give one process's losses; each holds its own blocks (MLP blocks, for
    speed). (CT's, FM's and backprop's data-parallel layout is checked on two devices by the test below.)"""
    r = subprocess_result("processes")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for group in ("dt_1", "mpirun", "dt_2"):
        assert all(code == 0 for code, _, _ in out[group]), (group, [e[-2000:] for _, _, e in out[group]])
    one, two = (json.load(open(os.path.join(r.args[-1], f"dt_{n}.json"))) for n in (1, 2))
    assert out["mpirun_record"]["processes"] == 2 and len(out["mpirun_record"]["history"]) == 1
    assert two["processes"] == 2 and one["processes"] == 1 and len(two["history"]) == 2
    # equal up to the order of the float sums that gather the shared classifier's gradients (bit-equal here)
    np.testing.assert_allclose([h["loss"] for h in two["history"]], [h["loss"] for h in one["history"]], rtol=1e-5)
    holds = [[l for l in e.splitlines() if l.startswith("process ")] for _, _, e in out["dt_2"]]
    assert holds == [["process 0 of 2, 1 device(s): blocks 1 of 2"], ["process 1 of 2, 1 device(s): blocks 2 of 2"]]
    assert out["dt_2"][1][1] == ""  # only process 0 prints
    (code, _, err), = out["alone"]
    assert code == 1 and err.strip().splitlines()[-1] == ("error: process 0 of 2: the processes did not all join at "
                                                          f"{err.split(' at ')[1].split()[0]} within 5 s")


@pytest.mark.subprocess("sharding", ["harness/sharding_check.py"],
                        env={"XLA_FLAGS": FAST_COMPILE + " --xla_force_host_platform_device_count=2"})
def test_sharding_step_equals_single_device_step_dt_blocks_and_ct_batch(subprocess_result):
    r = subprocess_result("sharding")
    assert r.returncode == 0 and "sharded == single-device" in r.stdout, r.stderr[-3000:]
