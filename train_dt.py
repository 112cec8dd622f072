"""Train NoProp-DT (paper Sec. 2.3, Eq. 8, Algorithm 1), or its backprop baseline (Eqs. 17-19),
and report train and test accuracy of Eq. 3's inference chain.

Example: python train_dt.py --epochs 10 --out results/dt.json
"""
import jax

import noprop
from harness import cli, data, loop, processes, variants
from viz import figures

DEFAULTS = dict(  # paper Table 3 (v2 Table 4), NoProp-DT and Backprop rows
    embedding="onehot",
    method="noprop", cls_scale=noprop.BACKPROP_CLS_SCALE,
    epochs=0,  # 0: the paper's (MNIST 100; CIFAR-10/100 150)
    batch_size=128, lr=1e-3, weight_decay=1e-3,  # AdamW
    T=10, eta=0.1, block="cnn",  # the block of Fig. 6 (noprop.CNN_BLOCK)
    classifier="softmax", embedding_init="prototype",  # Eq. 14, medoids: the paper's; v2 Figs. 6-7 ablate them
    seed=0, eval_runs=5,  # Table 1: 5 inference runs per seed, mean +- standard error
    train_limit=0, test_limit=0, deterministic=False,
    **cli.RUN_FLAGS,  # data, output, checkpoints, devices and processes
)


def main(argv=None):
    args = cli.parse_args(DEFAULTS, __doc__, argv, {"noprop": "dt", "backprop": "backprop"})
    processes.join_processes(args)  # only with --coordinator, or under srun / mpirun
    x_tr, y_tr, x_te, y_te = data.prepare_data(args)
    (image_shape, m), (k_init, k_run) = data.DATASETS[args.dataset], jax.random.split(jax.random.PRNGKey(args.seed))
    v = variants.from_args(args)  # noprop: the loss is noprop.loss_dt, the T blocks' L_t (Eq. 61) summed; or backprop's
    params, state = v.init(k_init, image_shape, m, args.embedding, x_tr, y_tr)
    record, tree = loop.fit(args, v, params, state, (x_tr, y_tr, x_te, y_te), k_run)  # prints, trains, evaluates, records
    return figures.plot_run(args, params, record, tree)  # --plot: the run's figures. Returns (record, tree)


if __name__ == "__main__":
    main()
