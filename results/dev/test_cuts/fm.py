"""FM dim20 learning test at another batch size: accuracy and embedding separation. Args: batch epochs seed."""
import sys, time, jax, jax.numpy as jnp, numpy as np, noprop, train_fm
DATA = "../shared/data"
B, E, seed = sys.argv[1:4]
t = time.time()
record, tree = train_fm.main(["--data-dir", DATA, "--embedding", "dim20", "--batch-size", B, "--epochs", E, "--lr", "2e-3", "--seed", seed,
    "--train-limit", "2048", "--test-limit", "500", "--steps", "20", "--eval-runs", "1", "--quiet"])
W = np.asarray(tree["params"]["W_embed"])
dists = np.linalg.norm(W[:, None] - W[None], axis=-1)[~np.eye(10, dtype=bool)]
norms = np.linalg.norm(W, axis=1)
print(sys.argv[1:], "acc %.3f norms.min %.2f dmin/normmean %.2f %.0f s" % (record["test_acc_mean"], norms.min(), dists.min() / norms.mean(), time.time() - t))
