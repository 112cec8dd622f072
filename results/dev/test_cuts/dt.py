"""DT learning test at other batch sizes/epochs: accuracy, zero-embedding and chain ablations. Args: batch epochs lr train_limit seed."""
import sys, time, jax, jax.numpy as jnp, numpy as np, noprop, train_dt
DATA = "../shared/data"
B, E, lr, lim = sys.argv[1:5]
t = time.time()
record, tree = train_dt.main(["--data-dir", DATA, "--T", "2", "--batch-size", B, "--epochs", E, "--lr", lr,
    "--train-limit", lim, "--test-limit", "500", "--eval-runs", "2", "--quiet", "--seed", sys.argv[5]])
_, _, x_te, y_te = noprop.load_dataset("mnist", DATA); x_te, y_te = x_te[:500], y_te[:500]
params, state, sched = tree["params"], tree["state"], noprop.cosine_schedule(2)
predict = jax.jit(noprop.predict_dt)
acc = lambda W, s: float(jnp.mean(predict({**params, "W_embed": W}, state, jax.random.PRNGKey(0), x_te, s) == y_te))
print(sys.argv[1:], "acc %.3f zero-emb %.3f chain %.3f  %.0f s" % (record["test_acc_mean"], acc(jnp.zeros((10,10)), sched), acc(jnp.eye(10), {**sched, "a": jnp.zeros(2)}), time.time() - t))
