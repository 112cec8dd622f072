"""Run by harness/test_processes.py: train_dt.py as 1 and as 2 jax.distributed processes on 127.0.0.1
(the blocks split between the processes; started as mpirun would, then resumed half way with the
flags), and a process whose partner never comes. Prints one JSON line.

python harness/processes_check.py TMP_DIR   (from the repository root)
"""
import json, os, random, socket, subprocess, sys

import numpy as np

tmp = sys.argv[1]
rng = np.random.default_rng(0)
np.savez(os.path.join(tmp, "mnist.npz"), x_train=rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
         y_train=rng.integers(0, 10, 64).astype(np.uint8), x_test=rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
         y_test=rng.integers(0, 10, 16).astype(np.uint8))


def free_port(mpirun):
    # under mpirun, jax takes the coordinator's port from the job id: 61440 + (id // 4096) % 4096. Pick a free
    # one at random in that range, since a fixed job id would collide with another suite running on this machine
    for port in random.sample(range(61440, 65536), 4096) if mpirun else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                pass


def start(script, tag, n, *extra, ranks=None, mpirun=False, join=120):
    # join: seconds a process waits for the others (NOPROP_JOIN_TIMEOUT); generous, since a dozen
    # processes start JAX at once on the test machine's cores, but short where a process never comes
    argv = [sys.executable, script, "--data-dir", tmp, "--batch-size", "16", "--eval-runs", "1", "--quiet", *extra]
    port = free_port(mpirun)
    many = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)] if n > 1 else []
    # mpirun's environment instead of the flags: jax.distributed finds the coordinator and ranks there
    ompi = lambda i: {"OMPI_MCA_orte_hnp_uri": f"{(port - 61440) * 4096}.0;tcp://127.0.0.1:{port}", "OMPI_COMM_WORLD_SIZE": str(n),
                      "OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_LOCAL_RANK": str(i)}
    return [subprocess.Popen(argv + ([] if mpirun else many(i)) + ["--out", os.path.join(tmp, f"{tag}.json")], text=True,
                             env={**os.environ, "NOPROP_JOIN_TIMEOUT": str(join), **(ompi(i) if mpirun else {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in ranks or range(n)]


def finish(procs):
    return [(p.wait(300), *p.communicate()) for p in procs]


# 2 processes hold a block each: vmap, so 1 too; the MLP block, as the check is of the processes, not the block
dt = ["train_dt.py", "--T", "2", "--block", "mlp"]
ck = ["--checkpoint-dir", os.path.join(tmp, "ck")]
groups = {"dt_1": start(*dt[:1], "dt_1", 1, *dt[1:], "--epochs", "2"),
          "mpirun": start(*dt[:1], "dt_2", 2, *dt[1:], "--epochs", "1", *ck, mpirun=True),  # found by environment
          "alone": start(*dt[:1], "alone", 2, *dt[1:], "--epochs", "1", ranks=[0], join=5)}  # process 1 never comes
out = {k: finish(v) for k, v in groups.items()}
out["mpirun_record"] = json.load(open(os.path.join(tmp, "dt_2.json")))
out["dt_2"] = finish(start(*dt[:1], "dt_2", 2, *dt[1:], "--epochs", "2", *ck, "--resume"))  # resumed, flags this time
print(json.dumps(out))
