"""Train NoProp-FM (paper Sec. 2.3.1, Eqs. 10-13, Algorithm 3) and report train and test accuracy.

Example: python train_fm.py --epochs 10 --out results/fm.json
"""
import functools

import jax

import noprop
from harness import cli, loop
from viz import figures

DEFAULTS = dict(  # paper Table 3 (v2 Table 4), NoProp-FM row
    dataset="mnist", data_dir="", offline=False, tfds=False, embedding="onehot",
    epochs=0,  # 0: the paper's (MNIST 100; CIFAR-10 500; CIFAR-100 1000)
    batch_size=128, lr=1e-3, weight_decay=1e-3,  # Adam with L2-coupled decay (not AdamW)
    steps=1000,  # Euler steps of the probability-flow ODE ("Timesteps 1000")
    seed=0, eval_runs=5, train_limit=0, test_limit=0,
    out="", checkpoint_dir="", resume=False, quiet=False, plot=False,
    devices=0, coordinator="", num_processes=1, process_id=0,  # one machine, or several (README: many devices)
)


def main(argv=None):
    args, data, (image_shape, m), k_init, k_run = cli.setup(DEFAULTS, __doc__, {"noprop": "fm"}, argv)
    params, state = noprop.init_ct(k_init, image_shape, m, args.embedding, *data[:2])
    print(f"NoProp-FM {args.dataset} {args.embedding}: model of {noprop.count_params(params['model']):,} "
          f"parameters, {len(data[0])} train / {len(data[2])} test images, {args.steps} inference steps")
    predict = jax.jit(functools.partial(noprop.predict_fm, steps=args.steps))
    optimizer = noprop.adam_l2(args.lr, args.weight_decay, params)
    return figures.finish(args, params, *loop.fit(args, noprop.loss_fm, predict, params, state, optimizer, data, k_run))


if __name__ == "__main__":
    main()
