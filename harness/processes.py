"""Several devices and several processes: jax.distributed, where the training state lives, gathering.

One process on one device needs none of this: join_processes and spread return at once, and gather
returns what it is given.
"""
import os
import re
import sys
import threading
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils

JOIN_TIMEOUT = int(os.environ.get("NOPROP_JOIN_TIMEOUT", 60))  # seconds to wait for the other processes


def join_processes(args):
    """Several processes (hosts) as one JAX program: jax.distributed, with CPU collectives over gloo.

    With --coordinator, or under a cluster manager that jax.distributed detects (SLURM, Open MPI)
    when it starts more than one task. jax.devices() then lists every process's devices; each
    process runs this script on the same flags, and only process 0 prints (the others' stdout is
    dropped). jax.distributed aborts the process from C++ when the others do not come, so the
    joining runs in a thread and this one gives up first, with one line.
    """
    # srun and mpirun set these for the tasks they start (an sbatch script alone does not)
    cluster = max(int(os.environ.get(k, 1)) for k in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")) > 1
    if args.num_processes == 1 and not cluster:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = (dict(coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
             if args.num_processes > 1 else {})  # {}: jax reads the cluster's environment
    outcome = []
    joining = threading.Thread(target=lambda: outcome.append(_initialize(where)), daemon=True)
    joining.start()
    joining.join(JOIN_TIMEOUT)
    if not outcome or outcome[0]:
        who = f"process {args.process_id} of {args.num_processes}" if args.coordinator else "this process"
        print(f"error: {who}: the processes did not all join at {args.coordinator or 'the cluster coordinator'} "
              f"within {JOIN_TIMEOUT} s"
              + (f" ({outcome[0]})" if outcome else ""), file=sys.stderr, flush=True)
        os._exit(1)  # the joining thread may be blocked in C++
    if jax.process_index() != 0:  # from here on, C++ prints (gloo's) included
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.stdout = open(os.devnull, "w")
    same = {k: v for k, v in sorted(vars(args).items()) if k not in PER_PROCESS}
    mine = np.array([args.num_processes, zlib.crc32(repr(same).encode()) & 0x7FFFFFFF], np.int32)
    every = multihost_utils.process_allgather(mine).reshape(-1, 2)
    if len(set(every[:, 0])) > 1 or (args.coordinator and jax.process_count() != args.num_processes):
        sys.exit(f"error: the processes were started with --num-processes {', '.join(map(str, every[:, 0]))}; "
                 f"{jax.process_count()} joined")
    if len(set(every[:, 1])) > 1:
        sys.exit("error: the processes were started with different flags; only --process-id, --data-dir, --out, "
                 "--checkpoint-dir, --offline, --tfds, --quiet and --plot may differ")


PER_PROCESS = ("process_id", "data_dir", "out", "checkpoint_dir", "quiet", "plot", "offline", "tfds")


def _initialize(where):
    try:
        jax.distributed.initialize(**where, initialization_timeout=JOIN_TIMEOUT + 30)
    except Exception as e:  # noqa: BLE001  gRPC/XLA errors share no type
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def place(tree, variant, n):
    """--devices n, with jax.sharding: where the training state and each batch live.

    NoProp-DT splits its stacked block axis over the devices, so each device trains T/n blocks
    and only the shared classifier and W_embed gradients cross devices. CT, FM and backprop
    split the batch (data parallel). jit inserts the collectives; the math is unchanged (tested).
    Returns (tree placed on the devices, sharding for a batch).
    """
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("dev",))
    split, whole = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s)) for s in (("dev",), ()))

    def where(path, _):
        keys = [getattr(k, "key", None) for k in path]
        return split if variant == "dt" and (keys[0] == "state" or "blocks" in keys) else whole

    return jax.device_put(tree, jax.tree_util.tree_map_with_path(where, tree)), (whole if variant == "dt" else split)


def spread(args, tree, xy):
    """--devices n or several processes: the training state and set placed on the devices (place), and where
    each batch goes. Returns (tree, xy, batch_sharding, n); one device in one process: as they are, None, 1."""
    n = device_count(args, args.variant)
    if n == 1 and jax.process_count() == 1:  # committed to the device now, as every step's output is: one compile
        return *jax.device_put((tree, xy), jax.devices()[0]), None, 1
    tree, batch_sharding = place(tree, args.variant, n)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    if jax.process_count() > 1:
        print(holdings(tree, args.variant), file=sys.stderr, flush=True)
    return tree, jax.device_put(xy, replicated), batch_sharding, n  # the training set on every device


def gather(tree):
    """The whole of every array on this host (several processes hold parts of the training state)."""
    return multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else tree


def holdings(tree, variant):
    """One line: what this process holds and trains (its blocks for DT; all weights otherwise)."""
    leaf = jax.tree.leaves(tree["params"]["blocks"] if variant == "dt" else tree["params"])[0]
    head = f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} device(s): "
    if variant != "dt":
        return head + "a full copy of the weights, its share of each batch"
    rows = sorted({s.index[0].indices(leaf.shape[0])[:2] for s in leaf.addressable_shards})
    return head + "blocks " + ", ".join(f"{a + 1}" + (f"-{b}" if b > a + 1 else "") for a, b in rows) + f" of {leaf.shape[0]}"


def device_count(args, variant):
    """--devices 0 (default): all local devices, or the most that divide the split axis.
    Several processes: every device of every process takes part."""
    size, what = (args.T, "T") if variant == "dt" else (args.batch_size, "--batch-size")
    if jax.process_count() > 1:
        n = jax.device_count()
        if args.devices not in (0, n):
            sys.exit(f"error: --devices {args.devices}, but the {jax.process_count()} processes have {n} devices, "
                     "and all of them train")
        if size % n:
            sys.exit(f"error: {n} devices over {jax.process_count()} processes must divide {what} = {size}")
        return n
    n = args.devices or max(k for k in range(1, jax.local_device_count() + 1) if size % k == 0)
    if n > jax.device_count():
        sys.exit(f"error: --devices {n}, but only {jax.device_count()} device(s) are visible")
    if size % n:
        sys.exit(f"error: --devices {n} must divide {what} = {size}")
    return n
