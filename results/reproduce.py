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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = {"dt": "train_dt.py", "backprop": "train_dt.py", "ct": "train_ct.py", "adjoint": "train_ct.py", "fm": "train_fm.py"}
FLAGS = {"backprop": ["--method", "backprop"], "adjoint": ["--method", "adjoint"]}
NAMES = {"backprop": "Backprop", "dt": "NoProp-DT", "adjoint": "Adjoint", "ct": "NoProp-CT", "fm": "NoProp-FM"}
EPOCHS = {"dt": (100, 150, 150), "backprop": (100, 150, 150), "ct": (100, 500, 1000), "adjoint": (2, 4, 4),
          "fm": (100, 500, 1000)}  # Table 4 (v1 Table 3), MNIST / CIFAR-10 / CIFAR-100
DATASETS = ("mnist", "cifar10", "cifar100")
# Table 1: (train, test) for MNIST, CIFAR-10, CIFAR-100
PAPER = {
    ("backprop", "onehot"): ("100.0±0.0", "99.46±0.06", "99.98±0.01", "79.92±0.14", "98.63±1.34", "45.85±2.07"),
    ("backprop", "dim20"): ("99.99±0.0", "99.43±0.03", "99.96±0.02", "79.3±0.52", "94.28±7.43", "46.57±0.87"),
    ("backprop", "prototype"): ("99.99±0.01", "99.44±0.05", "99.97±0.01", "79.58±0.44", "99.19±0.71", "47.8±0.19"),
    ("dt", "onehot"): ("99.92±0.01", "99.47±0.05", "95.02±0.19", "79.25±0.28", "84.97±0.67", "45.93±0.46"),
    ("dt", "dim20"): ("99.93±0.01", "99.49±0.04", "94.95±0.09", "79.12±0.37", "83.25±0.39", "45.19±0.22"),
    ("dt", "prototype"): ("99.97±0.0", "99.54±0.04", "97.23±0.11", "80.54±0.2", "90.7±0.14", "46.06±0.25"),
    ("adjoint", "onehot"): ("98.7±0.13", "98.62±0.14", "70.64±0.49", "66.78±0.76", "26.72±0.81", "25.03±0.7"),
    ("ct", "onehot"): ("97.88±0.61", "97.84±0.71", "97.31±0.84", "73.35±0.55", "75.1±3.43", "33.66±0.5"),
    ("ct", "dim20"): ("97.7±0.42", "97.7±0.51", "94.88±3.08", "71.77±2.47", "74.22±2.33", "33.99±1.08"),
    ("ct", "prototype"): ("97.18±1.02", "97.17±0.94", "86.2±7.34", "66.54±3.63", "40.88±10.72", "21.31±4.17"),
    ("fm", "onehot"): ("99.97±0.0", "99.21±0.09", "98.46±0.4", "73.14±0.9", "12.69±10.4", "6.38±4.9"),
    ("fm", "dim20"): ("99.99±0.0", "99.29±0.05", "99.49±0.15", "73.5±0.28", "83.49±4.62", "31.14±0.52"),
    ("fm", "prototype"): ("99.27±0.09", "98.52±0.16", "99.8±0.03", "75.18±0.57", "96.37±1.09", "37.57±0.32"),
}
ROWS = {f"{v}_{d}_{e}": (v, d, e) for d in DATASETS for (v, e) in PAPER}


def command(row, seed, epochs, data_dir, ckpt_root, out_dir="results", extra=()):
    v, d, e = ROWS[row]
    run = f"{row}_s{seed}"
    cmd = [sys.executable, SCRIPT[v], *FLAGS.get(v, []), "--dataset", d, "--embedding", e, "--epochs", str(epochs),
           "--seed", str(seed), "--eval-runs", "5", "--quiet", "--out", os.path.join(out_dir, f"{run}.json"),
           "--checkpoint-dir", os.path.join(ckpt_root, run), "--resume", *extra]
    return cmd + (["--data-dir", data_dir] if data_dir else [])


def finished(path, epochs):
    try:
        rec = json.load(open(path))
    except (OSError, ValueError):
        return False
    return "test_acc_mean" in rec and rec["epochs"] >= epochs


def table(results_dir=HERE):
    """Markdown rows from results/{row}_s*.json: mean +- s.e. over every seed x inference run."""
    out = ["| variant | embedding | dataset | epochs (paper) | seeds | train % | test % | paper train | paper test | hours |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row, (v, d, e) in ROWS.items():
        paths = [p for p in sorted(glob.glob(os.path.join(results_dir, f"{row}_s*.json"))) if re.search(r"_s\d+\.json$", p)]
        recs = [json.load(open(p)) for p in paths]
        recs = [r for r in recs if "test_acc_mean" in r]
        if not recs:
            continue
        col = DATASETS.index(d)

        def stat(key):
            v_ = 100 * np.concatenate([r[key] for r in recs])
            return f"{v_.mean():.2f} ± {v_.std(ddof=1) / np.sqrt(len(v_)):.2f}" if len(v_) > 1 else f"{v_.mean():.2f}"

        epochs = sorted({r["epochs"] for r in recs})
        out.append(f"| {NAMES[v]} | {e} | {d.upper()} | {'/'.join(map(str, epochs))} ({EPOCHS[v][col]}) | {len(recs)} | "
                   f"{stat('train_accs') if all('train_accs' in r for r in recs) else '-'} | **{stat('test_accs')}** | "
                   f"{PAPER[v, e][2 * col]} | {PAPER[v, e][2 * col + 1]} | "
                   f"{sum(r['train_seconds'] for r in recs) / 3600:.1f} |")
    return "\n".join(out)


def curves():
    """Per run: test (train) accuracy after every epoch, one inference run each, and the epoch's seconds."""
    out = []
    for p in sorted(glob.glob(os.path.join(HERE, "*_s*.json"))):
        if re.search(r"_s\d+(_\w+)?\.json$", p) and "_steps" not in p:
            r = json.load(open(p))
            out.append(f"- `{os.path.basename(p)[:-5]}`: " + ", ".join(
                f"{h['epoch']}: {100 * h['test_acc']:.2f}" + (f" ({100 * h['train_acc']:.2f})" if "train_acc" in h else "")
                + f" {h['train_seconds']:.0f} s" for h in r["history"]))
    return "\n".join(out)


def write_readme_table():
    for path, tag, text in ((os.path.join(ROOT, "README.md"), "table", table()),
                            (os.path.join(HERE, "README.md"), "curves", curves())):
        s = open(path).read()
        s = re.sub(f"<!-- {tag} -->.*?<!-- /{tag} -->", lambda _: f"<!-- {tag} -->\n{text}\n<!-- /{tag} -->", s, flags=re.S)
        with open(path + ".tmp", "w") as f:
            f.write(s)
        os.replace(path + ".tmp", path)


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
    a = p.parse_args(argv)
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
                    with open(run + ".log", "a") as log:
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
