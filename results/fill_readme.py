"""Fill the README's in-progress DT row and per-epoch table from results/dt_mnist_onehot_s0.json."""
import json, re, sys
rec = json.load(open("results/dt_mnist_onehot_s0.json"))
h = rec["history"]
table = ["| epoch | mean train loss | train seconds | images/s | test accuracy, 1 inference run (%) |",
         "|---:|---:|---:|---:|---:|"]
table += [f"| {e['epoch']} | {e['loss']:.3f} | {e['train_seconds']:.0f} | {e['images_per_s']:.0f} | {100 * e['test_acc']:.2f} |" for e in h]
acc = (f"{100 * rec['test_acc_mean']:.2f} +- {100 * rec['test_acc_stderr']:.2f} (5 runs)" if "test_acc_mean" in rec
       else f"{100 * h[-1]['test_acc']:.2f} (1 run, after epoch {len(h)})")
s = open("README.md").read()
start, end = "<!-- dt-run -->", "<!-- /dt-run -->"
block = (f"{start}\n| NoProp-DT | MNIST | one-hot | {len(h)} of 10 (paper: 100) | {acc} | 99.47 +- 0.05 | "
         f"{rec['train_seconds']:.0f} s | below |\n{end}")
s = re.sub(re.escape(start) + ".*?" + re.escape(end), block, s, flags=re.S)
s = re.sub(r"<!-- dt-epochs -->.*?<!-- /dt-epochs -->", "<!-- dt-epochs -->\n" + "\n".join(table) + "\n<!-- /dt-epochs -->", s, flags=re.S)
open("README.md", "w").write(s)
print(block)
