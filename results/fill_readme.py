"""Rewrite the README's results tables from the runs' JSON records in results/ (run from the repo root)."""
import json, re

RUNS = [  # (json, target epochs of the command, paper Table 1 test accuracy after 100 epochs)
    ("dt_mnist_onehot_s0", 10, "99.47 +- 0.05"),
    ("ct_mnist_onehot_s0", 3, "97.84 +- 0.71"),
    ("fm_mnist_onehot_s0", 3, "99.21 +- 0.09"),
    ("fm_mnist_dim20_s0", 3, "99.29 +- 0.05"),
]
NAMES = {"dt": "NoProp-DT", "ct": "NoProp-CT", "fm": "NoProp-FM"}
rows, epochs = [], []
for name, target, paper in RUNS:
    try:
        rec = json.load(open(f"results/{name}.json"))
    except FileNotFoundError:
        continue
    h = rec["history"]
    done = "test_acc_mean" in rec
    acc = (f"**{100 * rec['test_acc_mean']:.2f} +- {100 * rec['test_acc_stderr']:.2f}** (5 runs)" if done
           else f"{100 * h[-1]['test_acc']:.2f} (1 run; in progress)")
    status = f"{len(h)}" if done else f"{len(h)} of {target}"
    rows.append(f"| {NAMES[rec['variant']]} | {rec['dataset'].upper()} | {rec['embedding']} | {status} (paper: 100) | "
                f"{acc} | {paper} | {rec['train_seconds']:.0f} s | `results/{name}.log` |")
    epochs.append(f"`{name}`: " + ", ".join(f"epoch {e['epoch']}: {100 * e['test_acc']:.2f} % "
                                            f"({e['train_seconds']:.0f} s)" for e in h))
head = ["| variant | dataset | embedding | epochs | test accuracy (%) | paper, 100 epochs | train time | log |",
        "|---|---|---|---|---|---|---|---|"]
s = open("README.md").read()
s = re.sub(r"<!-- runs -->.*?<!-- /runs -->", "<!-- runs -->\n" + "\n".join(head + rows) + "\n<!-- /runs -->", s, flags=re.S)
s = re.sub(r"<!-- epochs -->.*?<!-- /epochs -->", "<!-- epochs -->\n" + "\n\n".join(epochs) + "\n<!-- /epochs -->", s, flags=re.S)
sweeps = []
for name, _, _ in RUNS:
    try:
        sw = json.load(open(f"results/{name}_steps.json"))
    except FileNotFoundError:
        continue
    sweeps.append(f"`{name}` after {sw['epochs']} epochs:\n\n| steps | test accuracy (%) | seconds per 10,000-image run |\n|---:|---:|---:|\n"
                  + "\n".join(f"| {r['steps']} | {100 * r['mean']:.2f} +- {100 * r['stderr']:.2f} | {r['seconds_per_run']:.1f} |"
                              for r in sw["rows"]))
if sweeps:
    s = re.sub(r"<!-- steps -->.*?<!-- /steps -->", "<!-- steps -->\n" + "\n\n".join(sweeps) + "\n<!-- /steps -->", s, flags=re.S)
open("README.md", "w").write(s)
print("\n".join(head + rows))
