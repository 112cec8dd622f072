"""Command-line flags shared by the three scripts: meanings, checks, and the start of a run."""
import argparse
import os
import re
import sys
import threading
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils

import noprop
from harness.data import DATASETS, default_data_dir, load_dataset

HELP = {
    "dataset": "dataset to train on",
    "data_dir": "where {dataset}.npz is read from, or downloaded to on first use ($NOPROP_DATA overrides the default)",
    "offline": "never touch the network: fail if the dataset is not already in --data-dir",
    "tfds": "read a copy prepared by tensorflow-datasets in --data-dir (preparing one needs TensorFlow)",
    "embedding": "class embedding W_embed: onehot (fixed identity), dim20 (learned, 20-d) or prototype (learned, image-sized)",
    "method": "noprop, or a baseline of Table 1: backprop (train_dt.py: the same blocks chained, trained end to end, "
              "Eqs. 17-19) or adjoint (train_ct.py: the CT model as a neural ODE, adjoint gradients)",
    "cls_scale": "backprop only: the classifier starts as cls_scale * pinv(W_embed); 0 = random init",
    "epochs": "training epochs; 0 = the paper's count for this dataset and method (Table 4)",
    "batch_size": "examples per step",
    "lr": "learning rate",
    "weight_decay": "weight decay (AdamW for DT/backprop, L2 before Adam for CT/FM)",
    "T": "number of blocks (diffusion steps)",
    "block_axis": "how the T blocks are compiled, same numbers either way: vmap (one batched program), unroll (T "
                  "ordinary ones: faster on a CPU), or auto (unroll on one CPU device, vmap on GPUs or several devices)",
    "eta": "weight eta of the denoising term (Eq. 8 for DT, Eq. 9 for CT)",
    "steps": "inference steps on [0, 1]",
    "clip": "CT only: clip the global gradient norm at this value; 0 = no clipping",
    "ema": "CT only: evaluate a moving average of the weights with this decay; 0 = the weights themselves",
    "seed": "random seed of initialisation, batches, noise and evaluation",
    "eval_runs": "independent inference runs at the end (mean +- standard error)",
    "train_limit": "train on the first N training images only; 0 = all",
    "test_limit": "evaluate on the first N test images only; 0 = all",
    "deterministic": "inference without the noise eps of Eq. 3",
    "out": "write the run's record (history, accuracies, settings) to this JSON file",
    "checkpoint_dir": "save a checkpoint here after every epoch",
    "resume": "continue from the checkpoint in --checkpoint-dir",
    "quiet": "no progress bar",
    "plot": "write figures next to --out at the end (needs matplotlib)",
    "devices": "devices to train on; 0 = all local ones (the most that divide T for DT, the batch otherwise)",
    "coordinator": "HOST:PORT of process 0, to train as one of --num-processes processes (jax.distributed)",
    "num_processes": "processes taking part, each with its own devices (1: this process alone)",
    "process_id": "this process's rank, 0 .. --num-processes - 1; process 0 prints, writes and checkpoints",
}
CHOICES = {"dataset": list(DATASETS), "embedding": ["onehot", "dim20", "prototype"], "block_axis": list(noprop.BLOCK_AXES)}
POSITIVE = ("batch_size", "eval_runs", "T", "steps", "lr", "num_processes")
NON_NEGATIVE = ("epochs", "train_limit", "test_limit", "weight_decay", "eta", "devices", "cls_scale", "clip", "ema",
                "process_id")
JOIN_TIMEOUT = int(os.environ.get("NOPROP_JOIN_TIMEOUT", 60))  # seconds to wait for the other processes
# Table 4's epochs for MNIST, CIFAR-10, CIFAR-100 (Fashion-MNIST, not in the paper, takes MNIST's)
PAPER_EPOCHS = {"dt": (100, 150, 150), "backprop": (100, 150, 150), "ct": (100, 500, 1000), "adjoint": (2, 4, 4),
                "fm": (100, 500, 1000)}


def parse_args(defaults, description, argv=None, variants=None):
    """argparse from a dict of defaults; bad values exit with a one-line usage error.

    variants: --method value -> variant name (its key in PAPER_EPOCHS), e.g. {"noprop": "ct", "adjoint": "adjoint"}.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    for k, v in defaults.items():
        flag, help = "--" + k.replace("_", "-"), HELP[k]
        v = v or default_data_dir() if k == "data_dir" else v
        if isinstance(v, bool):
            p.add_argument(flag, action="store_true", help=help)
        else:
            p.add_argument(flag, type=type(v), default=v, choices=list(variants) if k == "method" else CHOICES.get(k), help=help)
    args = p.parse_args(argv)
    for k in POSITIVE:
        if k in defaults and not getattr(args, k) > 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in NON_NEGATIVE:
        if k in defaults and not getattr(args, k) >= 0:
            p.error(f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    args.variant = variants[getattr(args, "method", "noprop")]
    if not args.epochs:
        args.epochs = PAPER_EPOCHS[args.variant][{"cifar10": 1, "cifar100": 2}.get(args.dataset, 0)]
    if not getattr(args, "ema", 0) < 1:
        p.error(f"--ema must be below 1, got {args.ema}")
    if args.process_id >= args.num_processes:
        p.error(f"--process-id must be below --num-processes = {args.num_processes}, got {args.process_id}")
    if args.num_processes > 1 and not re.fullmatch(r"[\w.-]+:\d+", args.coordinator):
        p.error(f"--num-processes {args.num_processes} needs --coordinator HOST:PORT (process 0's address), "
                f"got {args.coordinator!r}")
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    if getattr(args, "plot", False):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, an optional extra: pip install matplotlib")
    return args


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the script's docstring as written and shows every flag's default."""


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


def prepare_data(args):
    """Load, apply --train-limit/--test-limit (first N examples), move to the device."""
    if not args.quiet:
        print(f"loading {args.dataset} from {args.data_dir}...", flush=True)
    try:
        x_tr, y_tr, x_te, y_te = load_dataset(args.dataset, args.data_dir, args.offline, args.tfds)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.train_limit:
        x_tr, y_tr = x_tr[:args.train_limit], y_tr[:args.train_limit]
    if args.test_limit:
        x_te, y_te = x_te[:args.test_limit], y_te[:args.test_limit]
    if len(x_tr) < args.batch_size:
        sys.exit(f"error: {len(x_tr)} training examples is fewer than one batch of {args.batch_size}")
    return tuple(jax.device_put(a) for a in (x_tr, y_tr, x_te, y_te))


def setup(defaults, description, variants, argv=None):
    """A script's start: flags, data on the device, (image_shape, classes), init and run keys."""
    args = parse_args(defaults, description, argv, variants)
    join_processes(args)
    if getattr(args, "block_axis", "") == "auto":  # the run's JSON records the form noprop.unrolled picks
        args.block_axis = "unroll" if noprop.unrolled() else "vmap"
    data = prepare_data(args)
    k_init, k_run = jax.random.split(jax.random.PRNGKey(args.seed))
    return args, data, DATASETS[args.dataset], k_init, k_run
