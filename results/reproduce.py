"""The paper's Table 1, row by row: run what is missing, then rewrite the README's results table.

python -m results.reproduce --dry-run                      # print the whole plan (paper epochs, 3 seeds)
python -m results.reproduce --rows dt_mnist_onehot --epochs 10 --seeds 0
python -m results.reproduce --table                        # only regenerate the table from results/*.json

Each run writes results/{row}_s{seed}.json and .log and checkpoints every epoch to
--checkpoint-root/{row}_s{seed}, so an interrupted plan resumes where it stopped.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness.cli import PAPER_EPOCHS as EPOCHS, RUN_FLAGS  # noqa: E402  Table 4's epochs: MNIST, CIFAR-10, CIFAR-100
import train_ct, train_dt, train_fm  # noqa: E402  their DEFAULTS: the paper's settings
from harness.evaluate import TRAIN_EVAL  # noqa: E402  the training images train accuracy is measured on

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = {"dt": "train_dt.py", "backprop": "train_dt.py", "ct": "train_ct.py", "adjoint": "train_ct.py", "fm": "train_fm.py"}
FLAGS = {"backprop": ["--method", "backprop"], "adjoint": ["--method", "adjoint"]}
NAMES = {"backprop": "Backprop", "dt": "NoProp-DT", "adjoint": "Adjoint", "ct": "NoProp-CT", "fm": "NoProp-FM"}
DATASETS = ("mnist", "cifar10", "cifar100")
TITLES = dict(zip(DATASETS, ("MNIST", "CIFAR-10", "CIFAR-100")))
DEFAULTS = {"train_dt.py": train_dt.DEFAULTS, "train_ct.py": train_ct.DEFAULTS, "train_fm.py": train_fm.DEFAULTS}
# flags that are the table's columns, or say how a run is done, not what it computes
NOT_SETTINGS = {"epochs", "seed", "eval_runs", "dataset", "embedding", "method", "train_eval", *RUN_FLAGS}
# Table 1 as printed (results/paper_table1.txt): train and test accuracy (%) for MNIST, CIFAR-10, CIFAR-100
PAPER = {tuple(line.split()[:2]): tuple(line.split()[2:]) for line in open(os.path.join(HERE, "paper_table1.txt"))
         if line.strip() and not line.startswith("#")}
ROWS = {f"{v}_{d}_{e}": (v, d, e) for d in DATASETS for (v, e) in PAPER}


def command(row, seed, epochs, data_dir, ckpt_root, out_dir="results", extra=()):
    v, d, e = ROWS[row]
    run = f"{row}_s{seed}"
    cmd = [sys.executable, SCRIPT[v], *FLAGS.get(v, []), "--dataset", d, "--embedding", e, "--epochs", str(epochs),
           "--seed", str(seed), "--eval-runs", "5", "--quiet", "--out", os.path.join(out_dir, f"{run}.json"),
           "--checkpoint-dir", os.path.join(ckpt_root, run), "--resume", *extra]
    return cmd + (["--data-dir", data_dir] if data_dir else [])


CT_BEFORE_FLAGS = {"log_snr_init": 4.0, "sampler": "stochastic"}  # what CT runs recorded before these flags existed did


def deviations(rec):
    """The flags of a run that differ from its script's defaults, the paper's settings: e.g. "--steps 20", or ""."""
    defaults = DEFAULTS[SCRIPT[rec["variant"]]]
    skip = NOT_SETTINGS | ({"clip", "ema"} if rec["variant"] == "adjoint" else set())  # train_ct.py sets both to 0
    args = {**(CT_BEFORE_FLAGS if rec["variant"] == "ct" else {}), **rec["args"]}
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in args.items()
                    if k in defaults and k not in skip and v != defaults[k])


def finished(path, epochs):
    try:
        rec = json.load(open(path))
    except (OSError, ValueError):
        return False
    return "test_acc_mean" in rec and rec["epochs"] >= epochs


def finished_runs(results_dir, name_re):
    """(name match, record) of every finished run in results_dir whose file name matches name_re:
    a run still going, or a step sweep, has no test_acc_mean."""
    out = []
    for p in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        m = re.fullmatch(name_re, os.path.basename(p))
        rec = json.load(open(p)) if m else {}
        if "test_acc_mean" in rec:
            out.append((m, rec))
    return out


def table(results_dir=HERE):
    """Markdown rows from {results_dir}/{row}_s*.json (and its gpu/ folder, the runs made on a GPU: a row of
    their own): mean +- s.e. over every seed x inference run."""
    out = ["| variant | embedding | dataset | epochs (paper) | seeds | train % | test % | paper train | paper test | hours |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row, (v, d, e) in ROWS.items():
        for where in (results_dir, os.path.join(results_dir, "gpu")):
            recs = [r for _, r in finished_runs(where, rf"{row}_s\d+\.json")]
            if recs:
                out.append(table_row(v, d, e, recs))
    return "\n".join(out)


def table_row(v, d, e, recs):
    col = DATASETS.index(d)

    def stat(key):  # over the seeds that measured it (train accuracy came later than some runs)
        have = [r[key] for r in recs if key in r]
        if not have:
            return "-"
        v_ = 100 * np.concatenate(have)
        s = f"{v_.mean():.2f}±{v_.std(ddof=1) / np.sqrt(len(v_)):.2f}" if len(v_) > 1 else f"{v_.mean():.2f}"
        return s + (f" ({len(have)} of {len(recs)} seeds)" if len(have) < len(recs) else "")

    epochs = sorted({r["epochs"] for r in recs})
    note = "".join(f", {d}" for d in sorted({deviations(r) for r in recs}) if d)  # not the paper's settings
    note += "".join(f", on an {k}" for k in sorted({r["device"] for r in recs}) if k != "cpu")
    note += "".join(f", train % on {n:,} images" for n in sorted({r["args"].get("train_eval", TRAIN_EVAL) for r in recs
                                                                   if "train_accs" in r} - {TRAIN_EVAL}))
    return (f"| {NAMES[v]} | {e} | {TITLES[d]} | {'/'.join(map(str, epochs))} ({EPOCHS[v][col]}){note} | {len(recs)} | "
            f"{stat('train_accs')} | **{stat('test_accs')}** | {PAPER[v, e][2 * col]} | {PAPER[v, e][2 * col + 1]} | "
            f"{sum(r['train_seconds'] for r in recs) / 3600:.1f} |")


def runs(results_dir=HERE):
    """The command that made every finished run of the table, one line per row and epoch count."""
    seeds = {}
    for m, rec in finished_runs(results_dir, r"(\w+)_s(\d+)\.json"):
        if m[1] in ROWS:
            seeds.setdefault((m[1], rec["epochs"], deviations(rec)), []).append(m[2])
    return "\n".join(["```bash"] + [f"python -m results.reproduce --rows {row} --epochs {e} --seeds {','.join(s)}"
                                    + (f' --extra "{d}"' if d else "") for (row, e, d), s in seeds.items()] + ["```"])


def curves():
    """Per finished run: test (train) accuracy after every epoch, one inference run each, and the epoch's seconds."""
    out = []
    for m, r in finished_runs(HERE, r"(\w+_s\d+(_\w+)?)\.json"):
        out.append(f"- `{m[1]}`: " + ", ".join(
            f"{h['epoch']}: {100 * h['test_acc']:.2f}" + (f" ({100 * h['train_acc']:.2f})" if "train_acc" in h else "")
            + f" {h['train_seconds']:.0f} s" for h in r["history"]))
    return "\n".join(out)


def replace_section(path, tag, text):
    """Rewrite what stands between <!-- tag --> and <!-- /tag --> in a Markdown file, atomically."""
    s = open(path).read()
    s = re.sub(f"<!-- {tag} -->.*?<!-- /{tag} -->", lambda _: f"<!-- {tag} -->\n{text}\n<!-- /{tag} -->", s, flags=re.S)
    with open(path + ".tmp", "w") as f:
        f.write(s)
    os.replace(path + ".tmp", path)


def figure(results_dir=HERE, path=os.path.join(HERE, "figures", "mnist_onehot.png")):
    """Test accuracy of every MNIST one-hot variant against epoch, and (the paper's Figure 3) CT, FM
    and Adjoint against cumulative training seconds; one line per seed. Needs matplotlib (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for i, v in enumerate(NAMES):
        for m, rec in finished_runs(results_dir, rf"{v}_mnist_onehot_s(\d+)\.json"):
            h = rec["history"]
            acc = [100 * e["test_acc"] for e in h]
            label = NAMES[v] if m[1] == "0" else None
            by_epoch.plot(range(1, len(h) + 1), acc, f"C{i}", marker=".", label=label)
            if v in ("ct", "fm", "adjoint"):
                by_time.plot(np.cumsum([e["train_seconds"] for e in h]), acc, f"C{i}", marker=".", label=label)
    for ax, xlabel in ((by_epoch, "epoch"), (by_time, "cumulative training seconds (this CPU)")):
        ax.set(xlabel=xlabel, ylabel="test accuracy % (one inference run)", ylim=(94, 100))
        ax.grid(alpha=0.3)
        ax.legend()
    by_epoch.set_title("MNIST, one-hot: every variant")
    by_time.set_title("accuracy against training time (cf. Figure 3)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_readme_table():
    replace_section(os.path.join(ROOT, "README.md"), "table", table())
    replace_section(os.path.join(HERE, "README.md"), "runs", runs())
    replace_section(os.path.join(HERE, "README.md"), "curves", curves())
    figure()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="", help="comma-separated row names (default: all; --dry-run lists them)")
    p.add_argument("--seeds", default="0,1,2", help="the paper's protocol: 3 seeds x 5 inference runs")
    p.add_argument("--epochs", type=int, default=0, help="epochs of every run; 0 = the paper's (Table 4)")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="a fraction of the paper's epochs (at least 1)")
    p.add_argument("--data-dir", default="", help="passed to the scripts (default: theirs)")
    p.add_argument("--checkpoint-root", default=os.path.join(os.path.expanduser("~"), ".cache", "noprop", "checkpoints"))
    p.add_argument("--results-dir", default=HERE, help="where runs write JSON and logs (the README's table reads results/)")
    p.add_argument("--extra", default="", help="more flags for every script, e.g. '--train-limit 1280' for a smoke test")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--table", action="store_true", help="only rewrite the README's table from results/*.json")
    p.add_argument("--finished", nargs=2, metavar=("JSON", "EPOCHS"), help="only exit with 0 if JSON is a finished run "
                   "of EPOCHS epochs or more, else 1 (bench/gpu.sh asks)")
    a = p.parse_args(argv)
    if a.finished:
        sys.exit(0 if finished(a.finished[0], int(a.finished[1])) else 1)
    rows = a.rows.split(",") if a.rows else list(ROWS)
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown row {bad[0]!r}; rows are: {', '.join(ROWS)}")
    if not a.table:
        for row in rows:
            v, d, _ = ROWS[row]
            epochs = a.epochs or max(1, round(EPOCHS[v][DATASETS.index(d)] * a.epochs_scale))
            for seed in map(int, a.seeds.split(",")):
                run = os.path.join(a.results_dir, f"{row}_s{seed}")
                cmd = command(row, seed, epochs, a.data_dir, a.checkpoint_root, os.path.relpath(a.results_dir, ROOT),
                              a.extra.split())
                if a.dry_run:
                    print(" ".join(["python"] + cmd[1:]))
                elif not finished(run + ".json", epochs):
                    print(f"running {row} seed {seed} ({epochs} epochs)", flush=True)
                    resuming = os.path.exists(os.path.join(cmd[cmd.index("--checkpoint-dir") + 1], "checkpoint.npz"))
                    with open(run + ".log", "a" if resuming else "w") as log:  # a fresh run starts a fresh log
                        if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
                            sys.exit(f"error: {row} seed {seed} failed; see {run}.log")
    if a.dry_run:
        return
    if os.path.abspath(a.results_dir) == HERE:
        write_readme_table()
        print("README.md results table rewritten")
    else:
        print(table(a.results_dir))


if __name__ == "__main__":
    main()
