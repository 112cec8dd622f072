"""Rewrite the README's results tables from the runs' JSON records in results/ (run from the repo root)."""
import json, re

RUNS = [  # (json, target epochs of the command, paper Table 1 test accuracy after 100 epochs)
    ("dt_mnist_onehot_s0", 10, "99.47 +- 0.05"),
    ("backprop_mnist_onehot_s0", 10, "99.46 +- 0.06"),
    ("ct_mnist_onehot_s0", 3, "97.84 +- 0.71"),
    ("fm_mnist_onehot_s0", 3, "99.21 +- 0.09"),
    ("fm_mnist_dim20_s0", 3, "99.29 +- 0.05"),
]
NAMES = {"dt": "NoProp-DT", "backprop": "Backprop (Eqs. 17-19)", "ct": "NoProp-CT", "fm": "NoProp-FM"}
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
    rec = json.load(open(f"results/{name}.json"))
    if 1000 not in [r["steps"] for r in sw["rows"]] and "test_acc_mean" in rec:  # the run's own final evaluation
        sw["rows"].append({"steps": 1000, "mean": rec["test_acc_mean"], "stderr": rec["test_acc_stderr"],
                           "seconds_per_run": None, "note": " (the run's 5 final runs)"})
    sweeps.append(f"`{name}` after {sw['epochs']} epochs:\n\n| steps | test accuracy (%) | seconds per 10,000-image run |\n|---:|---:|---:|\n"
                  + "\n".join(f"| {r['steps']} | {100 * r['mean']:.2f} +- {100 * r['stderr']:.2f}{r.get('note', '')} | "
                              f"{'see bench' if r['seconds_per_run'] is None else '%.1f' % r['seconds_per_run']} |"
                              for r in sw["rows"]))
if sweeps:
    s = re.sub(r"<!-- steps -->.*?<!-- /steps -->", "<!-- steps -->\n" + "\n\n".join(sweeps) + "\n<!-- /steps -->", s, flags=re.S)
try:
    b = json.load(open("results/bench.json"))
    t, r, d = b["train_step"], b["ratios"], b["dispatch"]
    lines = [f"Measured by `python -m bench.speed` ({b['machine']}, jax {b['jax']}; float32 2048^3 matmul "
             f"**{b['matmul_gflop_per_s']:.0f} GFLOP/s** in the same run; `results/bench.json`, `results/bench.log`).", "",
             "| training step, MNIST, batch 128 | ms/step | images/s | GFLOP (XLA) | of matmul rate | temporaries MB | arguments MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['ms_per_step']:.0f} | {v['images_per_s']:.0f} | {v['gflop_per_step']:.1f} | "
              f"{100 * v['fraction_of_matmul_rate']:.0f} % | {v['temp_mb']:.0f} | {v['argument_mb']:.0f} |" for k, v in t.items()]
    lines += ["", f"- all-blocks step / ten one-block steps: **{r['all_blocks_vs_ten_one_block_steps']:.2f}x**",
              f"- one-block temporaries / backprop temporaries: **{100 * r['one_block_temp_vs_backprop_temp']:.0f} %**",
              f"- dispatch, one epoch ({d['steps']} CT steps): Python loop {d['python_loop_steps_per_s']:.2f} steps/s, "
              f"one compiled `lax.scan` {d['scan_steps_per_s']:.2f} steps/s "
              f"({d['scan_steps_per_s'] / d['python_loop_steps_per_s']:.2f}x)"]
    lines += [f"- {v.upper()} inference, {i['images']:,} images x {i['steps']} steps: image features once "
              f"**{i['features_once_s']:.1f} s**; recomputing the network every step {i['recompute_s_scaled']:.0f} s "
              f"(timed on {i['recompute_slice']} images, scaled): **{i['speedup']:.0f}x**" for v, i in b["inference"].items()]
    s = re.sub(r"<!-- bench -->.*?<!-- /bench -->", "<!-- bench -->\n" + "\n".join(lines) + "\n<!-- /bench -->", s, flags=re.S)
except FileNotFoundError:
    pass
open("README.md", "w").write(s)
print("\n".join(head + rows))
