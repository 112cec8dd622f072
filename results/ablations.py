"""The paper's two ablations of NoProp-DT on MNIST (v2 Figs. 6 and 7; Figs. 4 and 5 in v1), at a
5-epoch budget of the paper's settings otherwise (T = 10, batch 128, AdamW 1e-3, full MNIST, seed 0).

python -m results.ablations [--data-dir DIR] [--jobs N]   # runs what is missing, then rewrites the tables
                                                          # in results/README.md

Fig. 6: p(y|z_T) as softmax of a linear layer (Eq. 14) or the posterior form (Eqs. 15-16), for each
embedding. Fig. 7: W_embed at d = image size initialised as class medoids, orthogonal or random rows.
Each run writes results/ablations/{name}.json and .log and checkpoints every epoch, so an interrupted
plan resumes. --jobs runs several at once (on a GPU they share the device; on 2 CPU cores use 1).
"""
import argparse
import json
import os
import subprocess
import sys

from results import reproduce
from results.reproduce import replace_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EMBEDDINGS = ("onehot", "dim20", "prototype")
RUNS = {f"dt_mnist_{e}_{c}": ["--embedding", e, "--classifier", c] for e in EMBEDDINGS for c in ("softmax", "posterior")}
RUNS.update({f"dt_mnist_prototype_{i}": ["--embedding", "prototype", "--embedding-init", i] for i in ("orthogonal", "random")})
# read off the paper's bars (v2 Figs. 6 and 7); the softmax and prototype bars are Table 1's values
PAPER_FIG6 = {"onehot": ("99.47", "≈99.46"), "dim20": ("99.49", "≈99.48"), "prototype": ("99.54", "≈99.49")}
PAPER_FIG7 = {"prototype": "99.54", "orthogonal": "≈99.51", "random": "≈99.54"}


def command(name, epochs, data_dir, ckpt_root):
    return ([sys.executable, "train_dt.py", *RUNS[name], "--epochs", str(epochs), "--seed", "0", "--eval-runs", "5",
             "--quiet", "--out", f"results/ablations/{name}.json", "--checkpoint-dir", os.path.join(ckpt_root, name), "--resume"]
            + (["--data-dir", data_dir] if data_dir else []))


def finished(name, epochs):
    """The record of a finished run of at least `epochs` epochs, or None."""
    path = os.path.join(HERE, "ablations", f"{name}.json")
    return json.load(open(path)) if reproduce.finished(path, epochs) else None


def run_all(epochs, data_dir, ckpt_root, jobs):
    """Start every missing run, at most `jobs` at a time; stop naming any that failed."""
    todo, going, failed = [n for n in RUNS if not finished(n, epochs)], [], []
    os.makedirs(os.path.join(HERE, "ablations"), exist_ok=True)
    while todo or going:
        while todo and len(going) < jobs:
            name = todo.pop(0)
            print(f"running {name} ({epochs} epochs)", flush=True)
            log = open(os.path.join(HERE, "ablations", f"{name}.log"), "a")
            going.append((name, log, subprocess.Popen(command(name, epochs, data_dir, ckpt_root), cwd=ROOT, stdout=log,
                                                      stderr=subprocess.STDOUT)))
        name, log, proc = going.pop(0)
        if proc.wait():
            failed.append(name)
        log.close()
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed; see results/ablations/NAME.log")


def cell(rec):
    if not rec:
        return "-", "-", "-"
    det = rec["history"][-1].get("test_acc_deterministic")
    se = f"±{100 * rec['test_acc_stderr']:.2f}" if "test_acc_stderr" in rec else ""  # a record rebuilt from a checkpoint has none
    return (f"{100 * rec['test_acc_mean']:.2f}{se}", f"{100 * rec['train_acc_mean']:.2f}",
            f"{100 * det:.2f}" if det is not None else "-")


def tables(epochs):
    """The two ablation tables (Markdown), from the finished runs."""
    recs = {n: finished(n, epochs) for n in RUNS}
    devices = sorted({r["device"] for r in recs.values() if r})
    out = [f"{epochs} epochs of the paper's 100, seed 0; mean (± s.e.) of 5 inference runs; train % on the first 10,000 "
           f"training images; determ.: the chain without Eq. 3's noise eps (z_0 still drawn), mean of 5 runs. "
           f"Device: {', '.join(devices) or '-'}.",
           "", "| embedding | softmax test % | train % | determ. % | posterior test % | train % | determ. % "
           "| paper softmax | paper posterior |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in EMBEDDINGS:
        out.append(f"| {e} | " + " | ".join(cell(recs[f"dt_mnist_{e}_softmax"]) + cell(recs[f"dt_mnist_{e}_posterior"]))
                   + f" | {' | '.join(PAPER_FIG6[e])} |")
    out += ["", "| W_embed init (prototype, d = 784) | test % | train % | determ. % | paper |", "|---|---:|---:|---:|---:|"]
    for i, paper in PAPER_FIG7.items():
        label = "prototype (class medoids)" if i == "prototype" else f"{i} rows of the medoids' mean norm"
        out.append(f"| {label} | " + " | ".join(cell(recs["dt_mnist_prototype_" + ("softmax" if i == "prototype" else i)]))
                   + f" | {paper} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="epochs of every run")
    p.add_argument("--data-dir", default="", help="passed to the scripts (default: theirs)")
    p.add_argument("--checkpoint-root", default=os.path.join(os.path.expanduser("~"), ".cache", "noprop-runs", "ablations"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--table", action="store_true", help="only rewrite the tables from results/ablations/*.json")
    a = p.parse_args(argv)
    if a.jobs < 1 or a.epochs < 1:
        p.error("--jobs and --epochs must be positive")
    if not a.table:
        run_all(a.epochs, a.data_dir, a.checkpoint_root, a.jobs)
    text = tables(a.epochs)
    replace_section(os.path.join(HERE, "README.md"), "ablations", text)
    print(text)


if __name__ == "__main__":
    main()
