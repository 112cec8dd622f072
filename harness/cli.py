"""Command-line flags shared by the three scripts: their meanings, defaults and checks."""
import argparse
import os
import re
import tempfile

import noprop
from harness.data import DATASETS, default_data_dir
from harness.evaluate import TRAIN_EVAL
from harness.variants import BLOCKS

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
    "block": "the DT block (an init/apply pair of harness.variants.BLOCKS): cnn (Fig. 6, the paper's) or mlp (no convolutions)",
    "classifier": "NoProp-DT's p(y|z_T): softmax (Eq. 14, a linear layer) or posterior (Eqs. 15-16, "
                  f"sigma = {noprop.POSTERIOR_SIGMA})",
    "embedding_init": "W_embed's init for --embedding prototype: prototype (class medoids), or orthogonal or random "
                      "rows of the medoids' mean norm",
    "eta": "weight eta of the denoising term (Eq. 8 for DT, Eq. 9 for CT)",
    "steps": "inference steps on [0, 1]",
    "clip": "CT only: clip the global gradient norm at this value; 0 = no clipping",
    "schedule": "CT only: the noise schedule learned with the model (App. B, the paper's) or fixed at its init "
                "(--log-snr-init): the learned one can collapse to chance on CIFAR-100 (results/README.md)",
    "label_scale": "CT and adjoint: scale the label path's init weights (1 = PyTorch's default, the paper's silent choice); "
                   "with a one-hot z at d = 100 the default leaves u_hat flat (results/README.md)",
    "log_snr_init": "CT only: the learned schedule starts with log SNR(t) = -L at t = 0 rising to +L at t = 1 "
                    "(alpha_bar from sigmoid(-L) to sigmoid(L)); Eq. 9 weighs noise levels uniformly in SNR between the two",
    "sampler": "CT only: how inference runs: stochastic (Eq. 3 with its noise), deterministic (Eq. 3 without it) or "
               "ode (the probability-flow ODE, DDIM's step); the others are scored beside it",
    "ema": "CT only: evaluate a moving average of the weights with this decay; 0 = the weights themselves",
    "seed": "random seed of initialisation, batches, noise and evaluation",
    "eval_runs": "independent inference runs at the end (mean +- standard error)",
    "train_limit": "train on the first N training images only; 0 = all",
    "test_limit": "evaluate on the first N test images only; 0 = all",
    "train_eval": "after each epoch, score train accuracy on the first N training images; 0 = none",
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
CHOICES = {"dataset": list(DATASETS), "embedding": ["onehot", "dim20", "prototype"],
           "block": list(BLOCKS), "classifier": list(noprop.CLASSIFIERS),
           "embedding_init": list(noprop.EMBEDDING_INITS), "schedule": ["learned", "fixed"],
           "sampler": list(noprop.CT_SAMPLERS)}
RUN_FLAGS = dict(  # the flags every script has besides the paper's hyperparameters
    dataset="mnist", data_dir="", offline=False, tfds=False, out="", checkpoint_dir="", resume=False, quiet=False,
    plot=False, train_eval=TRAIN_EVAL, devices=0, coordinator="", num_processes=1, process_id=0)  # one machine, or several (README)
POSITIVE = ("batch_size", "eval_runs", "T", "steps", "lr", "num_processes", "label_scale", "log_snr_init")
NON_NEGATIVE = ("epochs", "train_limit", "test_limit", "train_eval", "weight_decay", "eta", "devices", "cls_scale", "clip", "ema",
                "process_id")
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
    check_combinations(p, args)
    return args


def check_combinations(p, args):
    """Flags that are valid alone but not together: exit through the parser with a one-line error."""
    if not getattr(args, "ema", 0) < 1:
        p.error(f"--ema must be below 1, got {args.ema}")
    if args.process_id >= args.num_processes:
        p.error(f"--process-id must be below --num-processes = {args.num_processes}, got {args.process_id}")
    if args.num_processes > 1 and not re.fullmatch(r"[\w.-]+:\d+", args.coordinator):
        p.error(f"--num-processes {args.num_processes} needs --coordinator HOST:PORT (process 0's address), "
                f"got {args.coordinator!r}")
    if getattr(args, "embedding_init", "prototype") != "prototype" and args.embedding != "prototype":
        p.error(f"--embedding-init {args.embedding_init} needs --embedding prototype (the init of image-sized embeddings)")
    if getattr(args, "schedule", "learned") != "learned" and args.method == "adjoint":
        p.error("--schedule is NoProp-CT's: the adjoint has no noise schedule")
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    for flag, folder in (("--out", os.path.dirname(args.out) if args.out else None), ("--checkpoint-dir", args.checkpoint_dir or None)):
        if folder is not None and (problem := unwritable(folder or ".")):  # found now, not after the first epoch
            p.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: {problem}")
    if args.out and os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder; name the JSON file to write")
    if getattr(args, "plot", False):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, an optional extra: pip install matplotlib")


def unwritable(folder):
    """Why files cannot be written in `folder` (made if missing), or "" if they can."""
    there = os.path.abspath(folder)
    while not os.path.exists(there):
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        return f"{there} is a file, not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return ""
    except OSError as e:
        return f"cannot write there ({e.strerror})"


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the script's docstring as written and shows every flag's default."""
