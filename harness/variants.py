"""Table 1's five variants as the scripts train them: name, init, loss, predict and optimiser.

The one table that the scripts, checkpoint restore (viz.figures), the benchmarks and the tests read.
Each builder takes its variant's hyperparameters (defaults: the paper's Table 4) and returns a
Variant whose functions have them bound:
  init(key, image_shape, m, embedding, x, y) -> (params, state)   x, y: the training set (prototype medoids)
  loss(params, state, key, x, y) -> (loss, (state, aux))          minimised by noprop.train_step
  predict(params, state, key, x) -> class labels                 images only; other samplers in `modes`
"""
import inspect
import math
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import noprop


def first(name, modes):
    """The inference modes, (name, predict's keyword arguments) pairs, with `name` first: the run's own."""
    return tuple(sorted(modes, key=lambda mode: mode[0] != name))


class Variant(NamedTuple):
    name: str
    init: Callable
    loss: Callable
    predict: Callable
    optimizer: optax.GradientTransformation
    modes: tuple = ()  # the inference modes predict offers: (name, its keyword arguments) pairs; the first is the default


# A DT block is an (init, apply) pair (noprop.py's conventions); the paper's is noprop.CNN_BLOCK (Fig. 6).
def init_mlp_block(key, image_shape, d, m, width=256):
    """A block without convolutions: [flatten(x), z] -> FC(width)-ReLU -> FC(width)-ReLU -> FC(m); no BN."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"fc1": noprop.init_dense(k1, math.prod(image_shape) + d, width), "fc2": noprop.init_dense(k2, width, width),
            "out": noprop.init_dense(k3, width, m)}, {}


def mlp_block(p, s, x, z, key=None):
    """Logits of the MLP block, with dropout after each hidden layer as in Fig. 6; its BN state stays empty."""
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    h = noprop.dropout(k1, jax.nn.relu(noprop.dense(p["fc1"], jnp.concatenate([x.reshape(x.shape[0], -1), z], -1))))
    return noprop.dense(p["out"], noprop.dropout(k2, jax.nn.relu(noprop.dense(p["fc2"], h)))), s


MLP_BLOCK = (init_mlp_block, mlp_block)
BLOCKS = {"cnn": noprop.CNN_BLOCK, "mlp": MLP_BLOCK}  # --block: add yours here


LR, WEIGHT_DECAY = 1e-3, 1e-3  # Table 4: every variant; AdamW for DT and backprop, "Adam, weight decay 1e-3" for CT, FM
# NOT SPECIFIED: gradient clipping. CT clips at global norm 1 (typical norms 3-30): Eq. 9's SNR'(t) weights
# let a few examples carry most of a batch's gradient, and unclipped steps jolt the image path.
CT_CLIP = 1.0


def adam_l2(lr, weight_decay, clip=0.0, schedule="learned"):
    """CT/FM optimiser "Adam, weight decay 1e-3": PyTorch-style L2 added before Adam's scaling.

    The schedule is not decayed (our choice: L2 would pull its endpoints toward 0). clip > 0 clips the
    whole gradient, L2 term included: clipped first (torch's clip_grad_norm_ before Adam.step()), the
    schedule's large gradient shrinks the image path's below its decay, which then wins.
    schedule="fixed" (not the paper's: it learns the schedule) zeroes the schedule's gradient before clipping.
    Where a weight's data gradient is below weight_decay * w, Adam shrinks it by ~lr a step: on CIFAR-100 this
    empties CT's image path (results/README.md; --weight-decay 0 keeps it).
    """
    def where(pick):  # a mask over the top-level entries of params (the same optimiser state either way)
        return lambda params: {k: jax.tree.map(lambda _: pick(k), v) for k, v in params.items()}

    clipping = [optax.clip_by_global_norm(clip)] if clip else []
    return optax.chain(optax.masked(optax.set_to_zero(), where(lambda k: k == "schedule" and schedule == "fixed")),
                       optax.add_decayed_weights(weight_decay, where(lambda k: k != "schedule")), *clipping, optax.adam(lr))


def dt(T=10, eta=0.1, block="cnn", lr=LR, weight_decay=WEIGHT_DECAY, classifier="softmax",
       embedding_init="prototype", deterministic=False):
    """NoProp-DT (Eq. 8, Algorithm 1, Eq. 3 inference), AdamW; classifier and embedding_init: Figs. 6, 7 of v2."""
    sched, b, c = noprop.cosine_schedule(T), BLOCKS[block], noprop.CLASSIFIERS[classifier]
    blocks = dict(block=b, classifier=c)
    return Variant("NoProp-DT", partial(noprop.init_dt, T=T, block=b, embedding_init=embedding_init),
                   partial(noprop.loss_dt, sched=sched, eta=eta, **blocks), partial(noprop.predict_dt, sched=sched, **blocks),
                   optax.adamw(lr, weight_decay=weight_decay),
                   first("deterministic" if deterministic else "stochastic",
                         (("stochastic", {"stochastic": True}), ("deterministic", {"stochastic": False}))))


def backprop(T=10, cls_scale=noprop.BACKPROP_CLS_SCALE, block="cnn", lr=LR, weight_decay=WEIGHT_DECAY):
    """The same blocks chained (Eqs. 17-19) and trained end to end by backprop, AdamW."""
    blocks = dict(block=BLOCKS[block])
    return Variant("Backprop", partial(noprop.init_backprop, T=T, cls_scale=cls_scale, block=blocks["block"]),
                   partial(noprop.loss_backprop, **blocks), partial(noprop.predict_backprop, **blocks),
                   optax.adamw(lr, weight_decay=weight_decay))


def ct(eta=1.0, steps=1000, clip=CT_CLIP, lr=LR, weight_decay=WEIGHT_DECAY, schedule="learned", label_scale=1.0,
       log_snr_init=noprop.LOG_SNR_INIT, sampler="deterministic"):
    """NoProp-CT (Eq. 9, Algorithm 2, inference by `sampler` of noprop.CT_SAMPLERS on a grid of `steps`), Adam with
    L2 decay; schedule: learned (App. B) or fixed at its init; label_scale, log_snr_init: noprop.init_ct's."""
    modes = first(sampler, tuple((name, {"sampler": name}) for name in noprop.CT_SAMPLERS))
    return Variant("NoProp-CT", partial(noprop.init_ct, label_scale=label_scale, log_snr_init=log_snr_init),
                   partial(noprop.loss_ct, eta=eta), partial(noprop.predict_ct, steps=steps),
                   adam_l2(lr, weight_decay, clip, schedule), modes)


def adjoint(steps=1000, lr=LR, weight_decay=WEIGHT_DECAY, label_scale=1.0):
    """The CT model as a neural ODE trained by the adjoint method (`steps` Euler steps), AdamW."""
    return Variant("Adjoint", partial(noprop.init_adjoint, label_scale=label_scale), partial(noprop.loss_adjoint, steps=steps),
                   partial(noprop.predict_adjoint, steps=steps), optax.adamw(lr, weight_decay=weight_decay))


def fm(steps=1000, lr=LR, weight_decay=WEIGHT_DECAY):
    """NoProp-FM (Eq. 13, Algorithm 3, `steps` Euler steps), Adam with L2 decay."""
    return Variant("NoProp-FM", noprop.init_fm, noprop.loss_fm, partial(noprop.predict_fm, steps=steps),
                   adam_l2(lr, weight_decay))


VARIANTS = {"dt": dt, "backprop": backprop, "ct": ct, "adjoint": adjoint, "fm": fm}


def from_args(args):
    """The Variant a run trains, from its flags: a script's parsed arguments, or the `args` a record or checkpoint
    keeps. Each builder's parameters are named as the flags are; a flag the run did not record keeps its default."""
    a = args if isinstance(args, dict) else vars(args)
    build = VARIANTS[a["variant"]]
    return build(**{k: a[k] for k in inspect.signature(build).parameters if k in a})
