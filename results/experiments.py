"""The short MNIST runs behind the README's "Experiments to try", one question each.

python -m results.experiments [--data-dir DIR]   # runs what is missing, then rewrites its section of results/README.md

Each run writes results/experiments/{name}.json and .log. The runs are deliberately short
(a slice of MNIST, 2 epochs), so compare numbers within a question only.
"""
import argparse
import json
import os
import subprocess
import sys

from results.reproduce import replace_section  # noqa: E402  (run as python -m results.experiments)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLICE = ["--T", "2", "--batch-size", "16", "--lr", "2e-3", "--train-limit", "2048", "--test-limit", "500",
         "--epochs", "2", "--eval-runs", "2"]  # the test suite's DT budget: 256 steps of 16 images
QUESTIONS = [  # (question, flags of every run, [(run name, script, its own flags)])
    ("Does the backprop baseline need its classifier init? (`--cls-scale`, T = 2 blocks, each embedding)", SLICE,
     [("backprop_cls5", "train_dt.py", ["--method", "backprop"]),
      ("backprop_cls0", "train_dt.py", ["--method", "backprop", "--cls-scale", "0"])]
     + [(f"backprop_{e}_cls{c}", "train_dt.py", ["--method", "backprop", "--embedding", e] + (["--cls-scale", "0"] if c == 0 else []))
        for e in ("dim20", "prototype") for c in (5, 0)]
     + [("dt_slice", "train_dt.py", [])]),
    ("Which block? Fig. 6's CNN, or an MLP without convolutions (`--block mlp`, T = 2 blocks)", SLICE,
     [("dt_slice", "train_dt.py", []), ("dt_mlp", "train_dt.py", ["--block", "mlp"])]),
    ("Softmax or posterior classifier p(y|z_T)? (v2 Fig. 6; `--classifier`, Eq. 14 or Eqs. 15-16)", SLICE,
     [("dt_slice", "train_dt.py", []), ("dt_posterior", "train_dt.py", ["--classifier", "posterior"])]
     + [(f"dt_{e}{c}", "train_dt.py", ["--embedding", e] + (["--classifier", "posterior"] if c else []))
        for e in ("dim20", "prototype") for c in ("", "_posterior")]),
    ("Which init for image-sized embeddings? (v2 Fig. 7; `--embedding prototype --embedding-init`)", SLICE,
     [("dt_prototype", "train_dt.py", ["--embedding", "prototype"])]
     + [(f"dt_prototype_{i}", "train_dt.py", ["--embedding", "prototype", "--embedding-init", i]) for i in ("orthogonal", "random")]),
]


def run(name, script, flags, data_dir):
    out = os.path.join(HERE, "experiments", f"{name}.json")
    if os.path.exists(out):
        return json.load(open(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [sys.executable, script, *flags, "--seed", "0", "--quiet", "--out", f"results/experiments/{name}.json"]
    with open(out[:-5] + ".log", "w") as log:
        if subprocess.run(cmd + (["--data-dir", data_dir] if data_dir else []), cwd=ROOT, stdout=log, stderr=log).returncode:
            sys.exit(f"error: {name} failed; see results/experiments/{name}.log")
    return json.load(open(out))


def section(data_dir):
    lines = []
    for question, common, runs in QUESTIONS:
        lines += [f"**{question}** Every run adds `{' '.join(common)}`.", "",
                  "| command | test % | also | train s |", "|---|---:|---|---:|"]
        for name, script, flags in runs:
            r = run(name, script, common + flags, data_dir)
            last = r["history"][-1]
            also = ", ".join(f"{k[9:]} {100 * v:.1f} %" for k, v in last.items() if k.startswith("test_acc_"))
            dead = sum(1 for v in r.get("test_class_recall", []) if v is not None and v < 0.05)
            also += (", " if also else "") + f"{dead} dead classes" if "backprop" in name else ""
            lines.append(f"| `python {' '.join([script] + flags)}` | {100 * r['test_acc_mean']:.1f} | {also} | "
                         f"{r['train_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="", help="passed to the scripts (default: theirs)")
    a = p.parse_args(argv)
    text = section(a.data_dir)
    replace_section(os.path.join(HERE, "README.md"), "experiments", text)
    print(text)


if __name__ == "__main__":
    main()
