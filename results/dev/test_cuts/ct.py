"""CT learning test at another batch size: accuracy, 5-step accuracy, zero embedding at 5 steps. Args: batch epochs seed."""
import sys, time, jax, jax.numpy as jnp, numpy as np, noprop, train_ct
DATA = "../shared/data"
B, E, seed = sys.argv[1:4]
t = time.time()
record, tree = train_ct.main(["--data-dir", DATA, "--batch-size", B, "--epochs", E, "--lr", "2e-3", "--seed", seed,
    "--train-limit", "2048", "--test-limit", "500", "--steps", "20", "--eval-runs", "1", "--quiet"])
_, _, x_te, y_te = noprop.load_dataset("mnist", DATA); x_te, y_te = x_te[:500], y_te[:500]
params = tree["params"]
predict = jax.jit(noprop.predict_ct, static_argnums=4)
acc = lambda W, s: float(jnp.mean(predict({**params, "W_embed": W}, {}, jax.random.PRNGKey(0), x_te, s) == y_te))
print(sys.argv[1:], "acc %.3f at5 %.3f zero-emb5 %.3f  %.0f s" % (record["test_acc_mean"], acc(jnp.eye(10), 5), acc(jnp.zeros((10,10)), 5), time.time() - t), [round(h["test_acc"], 3) if "test_acc" in h else h.keys() for h in record["history"]])
