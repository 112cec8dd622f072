"""Test accuracy and time against inference steps for a trained CT or FM checkpoint.

python results/steps_sweep.py CHECKPOINT.npz --out results/ct_steps.json
"""
import argparse, json, os, sys, time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import evaluate, variants  # noqa: E402
from viz.figures import restore  # noqa: E402
from harness.data import default_data_dir  # noqa: E402

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("checkpoint")
p.add_argument("--data-dir", default=default_data_dir())
p.add_argument("--steps", default="10,20,40,100,1000")
p.add_argument("--eval-runs", type=int, default=5)
p.add_argument("--out", default="")
args = p.parse_args()
with np.load(args.checkpoint, allow_pickle=False) as f:
    variant = json.loads(str(f["__meta__"]))["variant"]
if variant not in ("ct", "fm"):
    sys.exit(f"error: {args.checkpoint} is a {variant} checkpoint; this sweep is for ct and fm")
meta, _, tree, _, (_, _, x_te, y_te) = restore(args.checkpoint, args.data_dir)
k_run = jax.random.split(jax.random.PRNGKey(meta["seed"]))[1]
k_eval = jax.random.split(k_run)[1]  # the key fit() evaluates with
rows = []
for steps in map(int, args.steps.split(",")):
    predict = jax.jit(variants.VARIANTS[meta["variant"]](steps=steps).predict)
    evaluate.predictions(predict, tree["eval"], {}, k_eval, x_te[:1000], 1)  # compile
    t0 = time.time()
    accs = evaluate.accuracies(evaluate.predictions(predict, tree["eval"], {}, k_eval, x_te, args.eval_runs), y_te)
    seconds = (time.time() - t0) / args.eval_runs
    mean, se = evaluate.mean_stderr(accs)
    rows.append({"steps": steps, "test_accs": accs, "mean": mean, "stderr": se, "seconds_per_run": seconds})
    print(f"{steps:5d} steps: {100 * mean:.2f} +- {100 * se:.2f} %  ({seconds:.1f} s per run of {len(x_te)} images)", flush=True)
if args.out:
    with open(args.out, "w") as f:
        json.dump({"checkpoint_meta": {k: v for k, v in meta.items() if k != "history"}, "epochs": len(meta["history"]),
                   "rows": rows}, f, indent=1)
