"""Train NoProp-FM (paper Sec. 2.3.1, Eqs. 10-13, Algorithm 3) and report train and test accuracy.

Example: python train_fm.py --epochs 10 --out results/fm.json
"""
import jax

import noprop
from harness import cli, data, loop, processes, variants
from viz import figures

DEFAULTS = dict(  # paper Table 3 (v2 Table 4), NoProp-FM row
    embedding="onehot",
    epochs=0,  # 0: the paper's (MNIST 100; CIFAR-10 500; CIFAR-100 1000)
    batch_size=128, lr=1e-3, weight_decay=1e-3,  # Adam with L2-coupled decay (not AdamW)
    steps=1000,  # Euler steps of the probability-flow ODE ("Timesteps 1000")
    seed=0, eval_runs=5, train_limit=0, test_limit=0,
    **cli.RUN_FLAGS,  # data, output, checkpoints, devices and processes
)


def main(argv=None):
    args = cli.parse_args(DEFAULTS, __doc__, argv, {"noprop": "fm"})
    processes.join_processes(args)  # only with --coordinator, or under srun / mpirun
    x_tr, y_tr, x_te, y_te = data.prepare_data(args)
    (image_shape, m), (k_init, k_run) = data.DATASETS[args.dataset], jax.random.split(jax.random.PRNGKey(args.seed))
    v = variants.from_args(args)  # the loss is noprop.loss_fm (Eq. 13)
    params, state = v.init(k_init, image_shape, m, args.embedding, x_tr, y_tr)
    record, tree = loop.fit(args, v, params, state, (x_tr, y_tr, x_te, y_te), k_run)  # prints, trains, evaluates, records
    return figures.plot_run(args, params, record, tree)  # --plot: the run's figures. Returns (record, tree)


if __name__ == "__main__":
    main()
