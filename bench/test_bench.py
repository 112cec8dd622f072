"""bench/speed.py cannot rot: each of its modes runs on tiny shapes in a fresh process and reports sane figures."""
import importlib.util
import json

import numpy as np
import pytest

from harness.testing import FAST_COMPILE, TMP

pytest_plugins = ["harness.testing"]

# every mode on tiny shapes in one process (--tiny adds the profile; FAST_COMPILE: these test meaning, not speed)
BENCH = ["-m", "bench.speed", "--tiny", "--out", TMP + "/bench.json"]
STEPS = {"noprop_dt_all_blocks_vmap", "noprop_dt_all_blocks_unroll", "noprop_dt_one_block", "backprop_unroll",
         "noprop_ct", "noprop_fm", "adjoint"}


@pytest.mark.subprocess("bench", BENCH, env={"XLA_FLAGS": FAST_COMPILE})
def test_bench_speed_runs_end_to_end_on_tiny_shapes(subprocess_result):
    """bench/speed.py cannot rot: every section runs (tiny shapes) and reports sane figures."""
    r = subprocess_result("bench")
    assert r.returncode == 0 and "inference" in r.stdout, r.stderr[-3000:]
    out = json.load(open(r.args[r.args.index("--out") + 1]))
    s = out["train_step"]["tiny"]
    assert set(s) == STEPS
    for name, r in s.items():
        assert r["ms_per_step"] > 0 and (name == "adjoint" or r["gflop_per_step"] > 0) and r["temp_mb"] >= 0
    # the all-blocks step does T times the one-block work, in either form of the block axis
    for form in ("vmap", "unroll"):
        assert 1.5 < s[f"noprop_dt_all_blocks_{form}"]["gflop_per_step"] / s["noprop_dt_one_block"]["gflop_per_step"] < 2.5
    # the backprop chain does the DT step's forward work and backward through it: about the same count
    np.testing.assert_allclose(s["backprop_unroll"]["gflop_per_step"], s["noprop_dt_all_blocks_unroll"]["gflop_per_step"], rtol=0.3)
    if importlib.util.find_spec("torch"):  # the PyTorch references, where torch is installed
        assert all(s[k]["speed_vs_pytorch"] > 0 for k in STEPS - {"noprop_dt_one_block", "adjoint"})
    assert out["dispatch"]["train_steps_steps_per_s"] > 0 and out["inference"]["features_once"]["ct"]["speedup"] > 0
    assert out["matmul_gflop_per_s"] > 0


@pytest.mark.subprocess("bench", BENCH, env={"XLA_FLAGS": FAST_COMPILE})
def test_profile_names_the_dt_steps_ops_by_primitive_and_pass(subprocess_result):
    """--profile accounts for the step's op time: matmuls forward and backward, the dropout draws, shares sum to 1."""
    r = subprocess_result("bench")
    assert r.returncode == 0, r.stderr[-3000:]
    prof = json.load(open(r.args[r.args.index("--out") + 1]))["profile"]
    ops = prof["ops"]
    assert abs(sum(o["share"] for o in ops) - 1) < 1e-6 and 0 < prof["op_ms_total"]
    assert {("forward", "dot_general"), ("backward", "dot_general")} <= {(o["pass"], o["primitive"]) for o in ops}
    assert any("_bernoulli" in o["primitive"] for o in ops)  # dropout's random bits, found by name


@pytest.mark.subprocess("bench", BENCH, env={"XLA_FLAGS": FAST_COMPILE})
def test_memory_of_every_training_step_and_one_block_holds_less_than_backprop(subprocess_result):
    """The compiled temporaries of each step (what --memory reports alone, the paper's Table 2 counterpart)."""
    r = subprocess_result("bench")
    temp = {k: v["temp_mb"] for k, v in json.load(open(r.args[r.args.index("--out") + 1]))["train_step"]["tiny"].items()}
    assert set(temp) == STEPS
    assert temp["noprop_dt_one_block"] < temp["backprop_unroll"] and all(v > 0 for v in temp.values())


# bench/gpu.sh's rehearsal on a tiny MNIST-shaped file: split into parts and joined back (checked by SHA-256), one
# row in its two stages, the archive; the script as a user runs it, in bash
GPU_REHEARSAL = """
import os, subprocess, sys
import numpy as np
rng, root = np.random.default_rng(0), sys.argv[1]
os.makedirs(root + "/data", exist_ok=True)
np.savez(root + "/data/mnist.npz", x_train=rng.integers(0, 256, (64, 28, 28, 1), np.uint8), y_train=np.arange(64) % 10,
         x_test=rng.integers(0, 256, (16, 28, 28, 1), np.uint8), y_test=np.arange(16) % 10)
env = {**os.environ, "REHEARSE": "1", "TESTS": "0", "ROWS": "fm_mnist_onehot_s0", "OUT": root + "/out"}
sys.exit(subprocess.call(["bash", "bench/gpu.sh", root + "/data"], env=env))
"""


@pytest.mark.subprocess("gpu_rehearsal", ["-c", GPU_REHEARSAL, TMP + "/gpu"], env={"XLA_FLAGS": FAST_COMPILE})
def test_gpu_kit_rehearsal_splits_joins_runs_a_row_in_stages_and_archives_it(subprocess_result):
    import tarfile
    r = subprocess_result("gpu_rehearsal")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "mnist.npz: 1 parts of at most 58 MiB, joined, SHA-256 equal" in r.stdout
    archive = r.stdout.strip().splitlines()[-1]
    assert archive == r.args[-1] + "/out/gpu_results.tar.gz", archive
    with tarfile.open(archive) as tar:
        rec = json.load(tar.extractfile("gpu/fm_mnist_onehot_s0.json"))
        log = tar.extractfile("gpu/fm_mnist_onehot_s0.log").read().decode()
    assert rec["epochs"] == 2 and len(rec["history"]) == 2 and "test_acc_mean" in rec  # the last stage, complete
    assert "resumed from" in log and log.count("over 2 inference runs") == 2  # stage 1, then stage 2 resumed from it
