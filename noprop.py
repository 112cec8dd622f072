"""NoProp (Li, Teh, Pascanu 2025, arXiv:2503.24322) in plain JAX: functions over pytrees.

Conventions, stated once (paper section 2, Eq. 6):
- Time runs from noise to label. z_0 ~ N(0, I) is pure noise; z_T (DT) or z_1 (CT, FM) is
  the clean class embedding u_y = W_embed[y].
- alpha_bar_t = prod_{s=t}^{T} alpha_s INCREASES with t, so SNR(t) = alpha_bar/(1 - alpha_bar)
  increases too and every DT weight SNR(t) - SNR(t-1) is positive. This is the reverse of
  the DDPM index convention, which is where most public implementations go wrong.
- Shapes: images x (B, H, W, C) float32 in [0, 1]; labels y (B,) int; latents z (B, d).
- Parameters are nested dicts of arrays. The T DT blocks are ONE pytree whose leaves carry a
  leading axis T; they are trained together by one map over that axis (`map_blocks`, a `jax.vmap`)
  and run at inference by a `lax.scan` over it (`eq3_chain`).
- A DT block is an (init, apply) pair: init(key, image_shape, d, m) -> (params, BN state) and
  apply(params, state, x, z, key) -> (logits, state). CNN_BLOCK (Fig. 6) is the default; the DT
  and backprop functions take `block=` to train another one (harness/variants.py's BLOCKS adds an MLP).
- Batch-norm running statistics live in a separate `state` pytree. `key=None` means
  evaluation mode: dropout off, batch norm reads its running statistics.
- Where the paper is silent, our choice is a named constant or argument marked NOT SPECIFIED.
- Equation numbers are those of arXiv:2503.24322 (v1 and v2 number them alike).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

DROPOUT = 0.2  # Fig. 6: dropout(0.2) after each conv group
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # NOT SPECIFIED: PyTorch's BatchNorm defaults
COSINE_OFFSET = 0.02  # NOT SPECIFIED: offset s of the DT cosine schedule (see cosine_schedule)


# --- Layers: init_x(key, sizes) -> params, x(params, inputs) -> outputs ---

def init_dense(key, n_in, n_out):
    """Dense layer; NOT SPECIFIED init, chosen as PyTorch's default U(-1/sqrt(fan_in), +)."""
    kw, kb = jax.random.split(key)
    lim = 1.0 / math.sqrt(n_in)
    return {"W": jax.random.uniform(kw, (n_in, n_out), minval=-lim, maxval=lim),
            "b": jax.random.uniform(kb, (n_out,), minval=-lim, maxval=lim)}


def dense(p, x):
    return x @ p["W"] + p["b"]


def init_conv(key, c_in, c_out):
    """3x3 convolution, stored as (3, 3, c_in, c_out) like lax's HWIO."""
    p = init_dense(key, 9 * c_in, c_out)
    return {"W": p["W"].reshape(3, 3, c_in, c_out), "b": p["b"]}


def conv3x3(p, x):
    """3x3 VALID convolution as im2col + one matmul, (B, H, W, C) -> (B, H-2, W-2, C_out): a 3x3 convolution is nine
    shifted copies of the image side by side and one matmul. lax.conv's math, with a matmul backward, ~10x faster on
    XLA:CPU under vmap (bench/README.md)."""
    H, W = x.shape[-3] - 2, x.shape[-2] - 2
    patches = jnp.concatenate([x[..., i:i + H, j:j + W, :] for i in range(3) for j in range(3)], -1)
    return patches @ p["W"].reshape(-1, p["W"].shape[-1]) + p["b"]


def maxpool2(x):
    """2x2 max pooling, stride 2, flooring odd sizes (as PyTorch's MaxPool2d), as the max of four strided
    slices: a backward of elementwise selects, 2-5x faster on XLA:CPU than reshape + max or reduce_window."""
    H, W = x.shape[-3] // 2 * 2, x.shape[-2] // 2 * 2
    s = [x[..., i:H:2, j:W:2, :] for i in range(2) for j in range(2)]
    return jnp.maximum(jnp.maximum(s[0], s[1]), jnp.maximum(s[2], s[3]))


def dropout(key, x, rate=DROPOUT):
    """Inverted dropout; identity when key is None (evaluation)."""
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def init_batchnorm(n):
    """Batch norm: (learned affine params, running-statistics state)."""
    return ({"scale": jnp.ones(n), "bias": jnp.zeros(n)},
            {"mean": jnp.zeros(n), "var": jnp.ones(n)})


def batchnorm(p, s, x, train):
    """Batch norm over the batch axis. Returns (y, new running statistics)."""
    if train:
        mean, var = x.mean(0), x.var(0)
        n = x.shape[0]
        s = {"mean": (1 - BN_MOMENTUM) * s["mean"] + BN_MOMENTUM * mean,
             "var": (1 - BN_MOMENTUM) * s["var"] + BN_MOMENTUM * var * n / max(n - 1, 1)}
    else:
        mean, var = s["mean"], s["var"]
    return (x - mean) * jax.lax.rsqrt(var + BN_EPS) * p["scale"] + p["bias"], s


# --- The block axis: the T stacked DT blocks under one map ---

def map_blocks(f, xs):
    """f(*xs_t) for every t of the leading (block) axis of xs, outputs stacked: jax.vmap(f)(*xs).

    On a single CPU the same map is written out as a loop over t, which XLA:CPU runs faster (T ordinary
    convolutions rather than one batched one; bench/README.md). Same values and gradients (tested)."""
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
        return jax.vmap(f)(*xs)
    outs = [f(*jax.tree.map(lambda a: a[t], xs)) for t in range(jax.tree.leaves(xs)[0].shape[0])]
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)


# --- Architecture (Fig. 6; parameter counts of v2 Table 5) ---

def feature_size(image_shape):
    """Flattened size after the conv stack: 28 -> 26 -> 13 -> 11 -> 9 -> 4 (MNIST), x128 channels."""
    side = ((image_shape[0] - 2) // 2 - 4) // 2
    return 128 * side * side


def init_conv_stack(key, image_shape):
    """conv32 -> pool -> conv64 -> conv128 -> pool -> FC(256), all convs 3x3 VALID."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"conv1": init_conv(k1, image_shape[-1], 32), "conv2": init_conv(k2, 32, 64),
            "conv3": init_conv(k3, 64, 128), "fc": init_dense(k4, feature_size(image_shape), 256)}


def conv_stack(p, x, key=None):
    """Image path of Fig. 6 up to FC(256), before its BN (DT) or ReLU (CT). (B,H,W,C) -> (B,256)."""
    k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None,) * 3
    # relu(pool(.)) == pool(relu(.)) (relu is monotone); pooling first is 4x less relu work
    h = dropout(k1, jax.nn.relu(maxpool2(conv3x3(p["conv1"], x))))
    h = dropout(k2, jax.nn.relu(conv3x3(p["conv2"], h)))
    h = dropout(k3, jax.nn.relu(maxpool2(conv3x3(p["conv3"], h))))
    return dense(p["fc"], h.reshape(h.shape[0], -1))


def z_is_image(image_shape, d):
    """Sec. 4.3: when d equals the image size, z is an image and gets its own conv stack."""
    return d == math.prod(image_shape)


def init_dt_block(key, image_shape, d, m):
    """One DT block u_hat_t(z_{t-1}, x) (Fig. 6 left). Returns (params, batch-norm state)."""
    ks = jax.random.split(key, 7)
    p, s = {"img": init_conv_stack(ks[0], image_shape)}, {}
    names = ["img_bn", "head1_bn", "head2_bn"]
    if z_is_image(image_shape, d):
        p["lab"] = init_conv_stack(ks[1], image_shape)
        names.append("lab_bn")
    else:
        p["lab"] = init_dense(ks[1], d, 256)
        p["res1"], p["res2"] = init_dense(ks[2], 256, 256), init_dense(ks[3], 256, 256)
        names += ["lab_bn", "res1_bn", "res2_bn"]
    p["head1"], p["head2"] = init_dense(ks[4], 512, 256), init_dense(ks[5], 256, 128)
    p["out"] = init_dense(ks[6], 128, m)
    for name in names:
        p[name], s[name] = init_batchnorm(128 if name == "head2_bn" else 256)
    return p, s


def dt_block(p, s, x, z, key=None):
    """Logits of one DT block. x (B,H,W,C), z (B,d) -> (logits (B,m), new BN state)."""
    new_s, train = {}, key is not None

    def bn(name, h):
        h, new_s[name] = batchnorm(p[name], s[name], h, train)
        return h

    k_img, k_lab = jax.random.split(key) if train else (None, None)
    img = bn("img_bn", conv_stack(p["img"], x, k_img))
    if not z_is_image(x.shape[1:], z.shape[-1]):  # label path: FC-BN-ReLU, residual (FC-BN-ReLU-FC-BN)
        h = jax.nn.relu(bn("lab_bn", dense(p["lab"], z)))
        lab = h + bn("res2_bn", dense(p["res2"], jax.nn.relu(bn("res1_bn", dense(p["res1"], h)))))
    else:  # prototype: z is an image, processed like x by its own conv stack
        lab = bn("lab_bn", conv_stack(p["lab"], z.reshape(x.shape), k_lab))
    h = jax.nn.relu(bn("head1_bn", dense(p["head1"], jnp.concatenate([img, lab], -1))))
    h = jax.nn.relu(bn("head2_bn", dense(p["head2"], h)))
    return dense(p["out"], h), new_s


CNN_BLOCK = (init_dt_block, dt_block)  # Fig. 6, the paper's block


def count_params(p):
    return sum(leaf.size for leaf in jax.tree.leaves(p))


# --- Class embeddings W_embed (Sec. 2.2.1) and classifier p(y | z_T) (Eq. 14) ---

def embedding_dim(embedding, image_shape, m):
    return {"onehot": m, "dim20": 20, "prototype": math.prod(image_shape)}[embedding]


def medoid_images(x, y, m):
    """Per class, the image with the smallest median Euclidean distance to the others (Sec. 2.2.1)."""
    rows = []
    for c in range(m):
        xc = jnp.asarray(x[y == c].reshape(int((y == c).sum()), -1))
        sq = (xc * xc).sum(1)
        dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2 * xc @ xc.T, 0.0))
        dist = jnp.where(jnp.eye(len(xc), dtype=bool), jnp.nan, dist)  # "all other images"
        rows.append(xc[jnp.argmin(jnp.nanmedian(dist, axis=1))])
    return jnp.stack(rows)


EMBEDDING_INITS = ("prototype", "orthogonal", "random")  # of W_embed at d = image size (Fig. 7 of v2)


def init_embedding(key, embedding, m, image_shape, x=None, y=None, init="prototype"):
    """{"W_embed": (m, d)}, or {} for fixed one-hot (then W_embed = I, not a parameter).

    init: at d = image size, the class medoids (Sec. 2.2.1), or orthonormal or random rows. NOT SPECIFIED
    their scale: the medoids' mean norm, so the three differ in direction only.
    """
    if embedding == "onehot":
        return {}
    if embedding == "prototype":
        W = medoid_images(x, y, m)
        if init != "prototype":
            R = (jax.nn.initializers.orthogonal()(key, W.shape) if init == "orthogonal" else jax.random.normal(key, W.shape))
            W = R / jnp.linalg.norm(R, axis=1, keepdims=True) * jnp.linalg.norm(W, axis=1).mean()
        return {"W_embed": W}
    d = embedding_dim(embedding, image_shape, m)
    if m <= d:  # "orthogonal when possible": orthonormal rows
        return {"W_embed": jax.nn.initializers.orthogonal()(key, (m, d))}
    return {"W_embed": jax.random.normal(key, (m, d)) / math.sqrt(d)}  # NOT SPECIFIED: random otherwise


def class_embeddings(params):
    """W_embed (m, d): the learned matrix, or the identity for one-hot embeddings."""
    m = params["classifier"]["b"].shape[0]
    return params["W_embed"] if "W_embed" in params else jnp.eye(m)


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def linear_logits(params, z):
    """Eq. 14: p(y | z_T) = softmax(f(z_T)), f the linear classifier. Returns the logits (B, m)."""
    return dense(params["classifier"], z)


POSTERIOR_SIGMA = 0.35  # NOT SPECIFIED: sigma of Eq. 16 (see posterior_logits)


def posterior_logits(params, z, sigma=POSTERIOR_SIGMA):
    """Eqs. 15-16, the "posterior" classifier: y~ = softmax(f(z_T)) W_embed, p(y|z_T) ~ exp(-|y~ - u_y|^2 / 2 sigma^2).

    sigma = 0.35: y~ = u_y then gives its class p > 0.99 against 9 one-hot or orthonormal embeddings
    (sqrt 2 apart: 9 exp(-2 / (2 sigma^2)) < 0.003); prototype embeddings lie farther apart, so sharper.
    """
    W = class_embeddings(params)
    y_tilde = jax.nn.softmax(dense(params["classifier"], z)) @ W
    sq = (y_tilde ** 2).sum(-1, keepdims=True) - 2 * y_tilde @ W.T + (W ** 2).sum(-1)
    return -sq / (2 * sigma ** 2)


CLASSIFIERS = {"softmax": linear_logits, "posterior": posterior_logits}  # Fig. 6 of v2 compares the two


# --- Fixed cosine noise schedule and posterior coefficients (Eqs. 5-6, App. A.3) ---

def cosine_schedule(T, s=COSINE_OFFSET):
    """DT schedule: alpha_bar_t = cos^2(pi/2 * (1 - t/T + s) / (1 + 2s)), t = 0..T. NOT SPECIFIED beyond "fixed
    cosine": Nichol-Dhariwal's with the index reversed and a symmetric offset s, so 0 < alpha_bar_0 < ... <
    alpha_bar_T < 1 without clipping (s = 0.02: alpha_bar_0 = 1 - alpha_bar_T ~ 9e-4, log SNR in [-7, 7])."""
    t = jnp.arange(T + 1) / T
    return schedule_from_alpha_bar(jnp.cos(0.5 * jnp.pi * (1 - t + s) / (1 + 2 * s)) ** 2)


def schedule_from_alpha_bar(alpha_bar):
    """Everything Eqs. 3, 6 and 8 need from alpha_bar_0..T (increasing).

    alpha_t = alpha_bar_t / alpha_bar_{t+1}, alpha_T = alpha_bar_T (Eq. 6, product runs t -> T).
    For t = 1..T (Eq. 6, App. A.3):
      a_t = sqrt(alpha_bar_t)(1 - alpha_{t-1}) / (1 - alpha_bar_{t-1})
      b_t = sqrt(alpha_{t-1})(1 - alpha_bar_t) / (1 - alpha_bar_{t-1})
      c_t = (1 - alpha_bar_t)(1 - alpha_{t-1}) / (1 - alpha_bar_{t-1})
    """
    alpha = jnp.append(alpha_bar[:-1] / alpha_bar[1:], alpha_bar[-1])
    ab_t, ab_prev, al_prev = alpha_bar[1:], alpha_bar[:-1], alpha[:-1]
    return {"alpha_bar": alpha_bar, "alpha": alpha, "snr": alpha_bar / (1 - alpha_bar),
            "a": jnp.sqrt(ab_t) * (1 - al_prev) / (1 - ab_prev),
            "b": jnp.sqrt(al_prev) * (1 - ab_t) / (1 - ab_prev),
            "c": (1 - ab_t) * (1 - al_prev) / (1 - ab_prev)}


def sample_q(key, u_y, alpha_bar):
    """z ~ q(z_t | y) = N(sqrt(alpha_bar_t) u_y, (1 - alpha_bar_t) I), Eq. 6 (reparameterised)."""
    return jnp.sqrt(alpha_bar) * u_y + jnp.sqrt(1 - alpha_bar) * jax.random.normal(key, u_y.shape)


def kl_z0(u_y, alpha_bar_0):
    """KL(q(z_0|y) || N(0, I)) = 1/2 [ab_0 |u_y|^2 - d ab_0 - d log(1 - ab_0)], per example (Eq. 8)."""
    d = u_y.shape[-1]
    return 0.5 * (alpha_bar_0 * (u_y ** 2).sum(-1) - d * alpha_bar_0 - d * jnp.log1p(-alpha_bar_0))


# --- NoProp-DT: model, objective (Eq. 8 / Alg. 1) and inference (Eq. 3) ---

def init_dt(key, image_shape, m, embedding="onehot", x=None, y=None, T=10, block=CNN_BLOCK, embedding_init="prototype"):
    """Params {"blocks" (stacked, leading axis T), "classifier", ["W_embed"]} and BN state."""
    k_blocks, k_cls, k_emb = jax.random.split(key, 3)
    d = embedding_dim(embedding, image_shape, m)
    blocks, state = jax.jit(jax.vmap(lambda k: block[0](k, image_shape, d, m)))(  # one compile
        jax.random.split(k_blocks, T))
    return {"blocks": blocks, "classifier": init_dense(k_cls, d, m),
            **init_embedding(k_emb, embedding, m, image_shape, x, y, embedding_init)}, state


def loss_dt(params, state, key, x, y, sched, eta=0.1, block=CNN_BLOCK, classifier=linear_logits):
    """Sum over blocks t = 1..T of L_t (Eq. 61), all T blocks at once under one map_blocks.

    L_t = CE(p(y | z_T)) + KL(q(z_0|y) || p(z_0)) + (T/2) eta (SNR(t) - SNR(t-1)) |u_hat_t - u_y|^2,
    z_T ~ q(z_T|y) and block t's input z_{t-1} ~ q(z_{t-1}|y). L_t is Eq. 8 with its expectation
    over t ~ U{1, T} taken at one t (Algorithm 1's loss for block t), so sum_t L_t = T x Eq. 8.
    Block t's input is a sample with no gradient path (stop_gradient), so theta_t gets exactly
    dL_t/dtheta_t; the shared classifier and W_embed get the sum of the T gradients Algorithm 1
    would apply one by one.
    """
    W = class_embeddings(params)
    u_y, ab, T = W[y], sched["alpha_bar"], sched["a"].shape[0]
    dsnr = sched["snr"][1:] - sched["snr"][:-1]

    def block_loss(theta, bn, k, ab_prev):
        k_in, k_T, k_drop = jax.random.split(k, 3)
        z_prev = jax.lax.stop_gradient(sample_q(k_in, u_y, ab_prev))
        logits, bn = block[1](theta, bn, x, z_prev, k_drop)
        u_hat = jax.nn.softmax(logits) @ W  # Sec. 2.3.2: convex combination of embeddings
        ce = cross_entropy(classifier(params, sample_q(k_T, u_y, ab[-1])), y)
        return ce, jnp.mean(((u_hat - u_y) ** 2).sum(-1)), bn

    ce, l2, state = map_blocks(block_loss, (params["blocks"], state, jax.random.split(key, T), ab[:-1]))
    kl = jnp.mean(kl_z0(u_y, ab[0]))
    L_t = ce + kl + 0.5 * T * eta * dsnr * l2
    return L_t.sum(), (state, {"L_t": L_t, "ce": ce.mean(), "kl": kl, "l2": l2})


def eq3_chain(key, z0, sched, u_hat_fn, xs, stochastic=True):
    """Eq. 3 from z_0 as a lax.scan: z_t = a_t u_hat(xs_t, z_{t-1}) + b_t z_{t-1} + sqrt(c_t) eps_t (eps_t = 0 if not
    stochastic), xs scanned beside the coefficients: DT's stacked blocks, or CT's time grid. Returns z_T and the
    path (T, B, d)."""
    eps = jax.random.normal(key, (sched["a"].shape[0],) + z0.shape) * stochastic

    def step(z, inp):
        xs_t, a, b, c, e = inp
        z = a * u_hat_fn(xs_t, z) + b * z + jnp.sqrt(c) * e
        return z, z

    return jax.lax.scan(step, z0, (xs, sched["a"], sched["b"], sched["c"], eps))


def dt_chain(params, state, key, x, sched, stochastic=True, block=CNN_BLOCK):
    """Eq. 3 over the blocks from z_0 ~ N(0, I), from images alone: z_T and the path z_0 .. z_T (T + 1, B, d)."""
    W = class_embeddings(params)
    k0, k_eps = jax.random.split(key)
    z0 = jax.random.normal(k0, (x.shape[0], W.shape[1]))

    def u_hat(theta_and_bn, z):
        return jax.nn.softmax(block[1](*theta_and_bn, x, z)[0]) @ W

    zT, path = eq3_chain(k_eps, z0, sched, u_hat, (params["blocks"], state), stochastic)
    return zT, jnp.concatenate([z0[None], path])  # (jit drops the path where a caller does not use it)


def predict_dt(params, state, key, x, sched, stochastic=True, block=CNN_BLOCK, classifier=linear_logits):
    """Class predictions from images alone: argmax p(y|z_T) at the end of dt_chain."""
    return jnp.argmax(classifier(params, dt_chain(params, state, key, x, sched, stochastic, block)[0]), -1)


# --- NoProp-CT: model (Fig. 6 right), learned schedule (App. B), objective (Eq. 9), inference ---

# NOT SPECIFIED: the schedule's ends at init, log SNR(0) = -L and log SNR(1) = +L (gamma_1 = L, gamma_0 = -L). Eq. 9's
# term E_t[SNR'(t) f(t)] is the integral of f over SNR itself, so it weighs noise levels uniformly in SNR between the
# ends: at L = 4 (alpha_bar 0.018 to 0.982) 98 % of it lies at SNR > 1, where a one-hot z_t all but gives the label
# away and the image path learns little; at L = 2 (alpha_bar 0.12 to 0.88), 88 %. On CIFAR-10 L = 2 learns faster
# (results/README.md).
LOG_SNR_INIT = 2.0
GAMMA_HIDDEN = 32  # NOT SPECIFIED: width of the positive-weight network gamma_tilde


def time_embedding(t, dim=64):
    """'pos emb (64)' of t in [0, 1]: NOT SPECIFIED, transformer sinusoids of 1000 t. (B,) -> (B, 64)."""
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(dim // 2) / (dim // 2))
    angles = 1000.0 * t[:, None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


def init_continuous(key, image_shape, d, m):
    """The continuous-time model (Fig. 6 right): u_hat(z_t, x, t) of CT, v(z_t, x, t) of FM and the
    adjoint's vector field. Image, label and time paths, then a head; no BN."""
    ks = jax.random.split(key, 6)
    lab = init_conv_stack(ks[1], image_shape) if z_is_image(image_shape, d) else init_dense(ks[1], d, 256)
    return {"img": init_conv_stack(ks[0], image_shape), "lab": lab, "time": init_dense(ks[2], 64, 256),
            "head1": init_dense(ks[3], 768, 256), "head2": init_dense(ks[4], 256, 128),
            "out": init_dense(ks[5], 128, m)}


def continuous_features(p, x, key=None):
    """Image path (conv stack -> FC(256) -> ReLU) times W1[:256] + b1: head1(concat[img, lab, time]) splits into
    img @ W1[:256] + lab @ W1[256:512] + time @ W1[512:] + b1, so inference computes this once per image."""
    img = jax.nn.relu(conv_stack(p["img"], x, key))
    return img @ p["head1"]["W"][:256] + p["head1"]["b"]


def continuous_logits(p, feats, z, t, image_shape, key=None):
    """Logits from continuous_features (B,256), z_t (B,d) and t (B,) or (1,) (one t for all) -> (B, m)."""
    if z_is_image(image_shape, z.shape[-1]):  # z is an image: its own conv stack
        lab = conv_stack(p["lab"], z.reshape((z.shape[0],) + tuple(image_shape)), key)
    else:
        lab = dense(p["lab"], z)
    W1 = p["head1"]["W"]
    time = jax.nn.relu(dense(p["time"], time_embedding(t)))  # (1, 256) at inference: once per step
    h = jax.nn.relu(feats + jax.nn.relu(lab) @ W1[256:512] + time @ W1[512:])
    return dense(p["out"], jax.nn.relu(dense(p["head2"], h)))


def init_gamma(key, hidden=GAMMA_HIDDEN, ends=(-LOG_SNR_INIT, LOG_SNR_INIT)):
    """Parameters of the learnable schedule, ends = (gamma_0, gamma_1); positivity and gamma_1 > gamma_0 hold by
    construction."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (hidden,)), "b1": jax.random.normal(k2, (hidden,)),
            "w2": jax.random.normal(k3, (hidden,)), "w0": jnp.zeros(()),
            "gamma_0": jnp.float32(ends[0]), "gap": jnp.float32(math.log(math.expm1(ends[1] - ends[0])))}


def gamma(p, t):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0)(1 - gamma_bar(t)), Eqs. 66-67; decreasing in t, so in Eq. 67's
    names gamma(0) = gamma_1 (the noise end) and gamma(1) = gamma_0 (the label end).

    gamma_tilde(t) = softplus(w0) t + sum softplus(w2) sigmoid(softplus(w1) t + b1): a two-layer
    network with positive weights, so increasing; gamma_1 = gamma_0 + softplus(gap) > gamma_0.
    """
    sp = jax.nn.softplus

    def g_tilde(s):
        return sp(p["w0"]) * s + jax.nn.sigmoid(s[..., None] * sp(p["w1"]) + p["b1"]) @ sp(p["w2"])

    g_bar = (g_tilde(t) - g_tilde(jnp.zeros(()))) / (g_tilde(jnp.ones(())) - g_tilde(jnp.zeros(())))
    return p["gamma_0"] + sp(p["gap"]) * (1 - g_bar)


def alpha_bar_ct(p, t):
    """alpha_bar(t) = sigmoid(-gamma(t)), so SNR(t) = exp(-gamma(t)) (Eq. 65)."""
    return jax.nn.sigmoid(-gamma(p, t))


def snr_prime(p, t):
    """SNR'(t) = d/dt exp(-gamma(t)) by forward-mode autodiff, per element of t."""
    return jax.jvp(lambda s: jnp.exp(-gamma(p, s)), (t,), (jnp.ones_like(t),))[1]


def init_fm(key, image_shape, m, embedding="onehot", x=None, y=None, label_scale=1.0):
    """Params {"model", "classifier", ["W_embed"]} of FM and the adjoint: no noise schedule, no BN state.

    label_scale multiplies the dense label path's init weights (not the paper's; 1 = PyTorch's U(+-1/sqrt(d))):
    a one-hot z gives that path features of size 1/sqrt(d), and at d = 100 CT's u_hat then stays flat.
    """
    k_model, _, k_cls, k_emb = jax.random.split(key, 4)  # the second is CT's schedule's key (init_ct)
    d = embedding_dim(embedding, image_shape, m)
    model = jax.jit(init_continuous, static_argnums=(1, 2, 3))(k_model, image_shape, d, m)  # one compile
    if not z_is_image(image_shape, d):
        model["lab"]["W"] = label_scale * model["lab"]["W"]
    return {"model": model, "classifier": init_dense(k_cls, d, m),
            **init_embedding(k_emb, embedding, m, image_shape, x, y)}, {}


def init_ct(key, image_shape, m, embedding="onehot", x=None, y=None, label_scale=1.0, log_snr_init=LOG_SNR_INIT):
    """init_fm's params plus the learnable noise schedule, {"schedule"} (App. B), starting with log SNR(t) from
    -log_snr_init at t = 0 to +log_snr_init at t = 1."""
    params, state = init_fm(key, image_shape, m, embedding, x, y, label_scale)
    ends = (-log_snr_init, log_snr_init)
    k_schedule = jax.random.split(key, 4)[1]  # the key init_fm leaves unused
    return {**params, "schedule": init_gamma(k_schedule, ends=ends)}, state


def loss_ct(params, state, key, x, y, eta=1.0):
    """Eq. 9 / Algorithm 2: CE(p(y|z_1)) + KL(q(z_0|y)||p(z_0)) + (eta/2) E_t[SNR'(t) |u_hat - u_y|^2].

    t ~ U(0, 1) per example; z_t ~ q(z_t|y) reparameterised, so the schedule learns from all terms.
    """
    W, g = class_embeddings(params), params["schedule"]
    u_y = W[y]
    k_t, k_z, k_1, k_drop = jax.random.split(key, 4)
    t = jax.random.uniform(k_t, y.shape)
    z_t = sample_q(k_z, u_y, alpha_bar_ct(g, t)[:, None])
    k_img, k_lab = jax.random.split(k_drop)
    logits = continuous_logits(params["model"], continuous_features(params["model"], x, k_img), z_t, t, x.shape[1:], k_lab)
    sq_err = ((jax.nn.softmax(logits) @ W - u_y) ** 2).sum(-1)
    weight = snr_prime(g, t)
    sdm = 0.5 * eta * jnp.mean(weight * sq_err)
    readout = dense(params["classifier"], sample_q(k_1, u_y, alpha_bar_ct(g, jnp.ones(()))))
    ce = cross_entropy(readout, y)
    kl = jnp.mean(kl_z0(u_y, alpha_bar_ct(g, jnp.zeros(()))))
    ends = alpha_bar_ct(g, jnp.array([0.0, 1.0]))  # logged every epoch: the learned schedule's ends, and how well p(y|z_1) reads z_1 ~ q
    return ce + kl + sdm, (state, {"ce": ce, "kl": kl, "sdm": sdm, "alpha_bar_0": ends[0], "alpha_bar_1": ends[1],
                                   "readout_acc": jnp.mean(jnp.argmax(readout, -1) == y),
                                   "weight_max_over_mean": jnp.max(weight) / jnp.mean(weight)})


def ct_grid_schedule(gamma_params, steps):
    """The DT coefficients of Eq. 3 on the grid t_k = k/steps, alpha_bar_k = alpha_bar(t_k)."""
    return schedule_from_alpha_bar(alpha_bar_ct(gamma_params, jnp.linspace(0.0, 1.0, steps + 1)))


def probability_flow_schedule(alpha_bar):
    """Coefficients of the deterministic DDIM step (Song et al. 2021) in Eq. 3's form, c_t = 0: with
    eps_hat = (z_{t-1} - sqrt(alpha_bar_{t-1}) u_hat) / sqrt(1 - alpha_bar_{t-1}), the noise z_{t-1} carries,
    z_t = sqrt(alpha_bar_t) u_hat + sqrt(1 - alpha_bar_t) eps_hat, i.e.
      b_t = sqrt((1 - alpha_bar_t) / (1 - alpha_bar_{t-1})),  a_t = sqrt(alpha_bar_t) - b_t sqrt(alpha_bar_{t-1}).
    A discretisation of the probability-flow ODE, whose marginals are q(z_t) as those of Eq. 3's chain are;
    Eq. 3 without its eps is not (it shrinks the noise toward the mean at every step)."""
    ab_t, ab_prev = alpha_bar[1:], alpha_bar[:-1]
    b = jnp.sqrt((1 - ab_t) / (1 - ab_prev))
    return {"alpha_bar": alpha_bar, "a": jnp.sqrt(ab_t) - b * jnp.sqrt(ab_prev), "b": b, "c": jnp.zeros_like(b)}


# NOT SPECIFIED: how CT's 1000 inference steps run. "stochastic": Eq. 3 on the grid, as DT; "deterministic": Eq. 3
# without its noise; "ode": the probability-flow ODE on the same grid (probability_flow_schedule).
CT_SAMPLERS = ("stochastic", "deterministic", "ode")


def ct_chain(params, key, x, steps=1000, sampler="stochastic"):
    """Inference on a grid of `steps` (our discretisation: the paper names none) from images alone, image features
    once, by one of CT_SAMPLERS: z_T and the path z_0 .. z_T (steps + 1, B, d)."""
    W, model = class_embeddings(params), params["model"]
    feats = continuous_features(model, x)
    k0, k_eps = jax.random.split(key)
    z0 = jax.random.normal(k0, (x.shape[0], W.shape[1]))

    def u_hat(t_prev, z):
        return jax.nn.softmax(continuous_logits(model, feats, z, jnp.full((1,), t_prev), x.shape[1:])) @ W

    sched = ct_grid_schedule(params["schedule"], steps)
    if sampler == "ode":
        sched = probability_flow_schedule(sched["alpha_bar"])
    t_prev = jnp.arange(steps) / steps
    zT, path = eq3_chain(k_eps, z0, sched, u_hat, t_prev, sampler == "stochastic")
    return zT, jnp.concatenate([z0[None], path])


def predict_ct(params, state, key, x, steps=1000, sampler="stochastic"):
    """Class predictions from images alone: argmax p(y|z_T) at the end of ct_chain."""
    return jnp.argmax(dense(params["classifier"], ct_chain(params, key, x, steps, sampler)[0]), -1)


# --- NoProp-FM: flow matching (Eqs. 10-13, Algorithm 3), Euler inference, nearest embedding ---

FM_SIGMA = 0.0  # NOT SPECIFIED: sigma of the path in Eq. 10 (0: the straight path exactly)


def loss_fm(params, state, key, x, y, sigma=FM_SIGMA):
    """Eq. 13: |v(z_t, x, t) - (u_y - z_0)|^2, plus CE(p(y | z~_1)) only for learnable W_embed.

    z_t = t u_y + (1 - t) z_0 (+ sigma noise), t ~ U(0, 1) per example; v = logits @ W_embed
    (no softmax, Sec. 2.3.2); the anchor z~_1 = z_t + (1 - t) v (Eq. 12) keeps embeddings apart.
    """
    W, model = class_embeddings(params), params["model"]
    u_y = W[y]
    k0, k_t, k_s, k_drop = jax.random.split(key, 4)
    z0, t = jax.random.normal(k0, u_y.shape), jax.random.uniform(k_t, y.shape)[:, None]
    z_t = t * u_y + (1 - t) * z0 + sigma * jax.random.normal(k_s, u_y.shape)
    k_img, k_lab = jax.random.split(k_drop)
    v = continuous_logits(model, continuous_features(model, x, k_img), z_t, t[:, 0], x.shape[1:], k_lab) @ W
    fm = jnp.mean(((v - (u_y - z0)) ** 2).sum(-1))
    if "W_embed" not in params:  # fixed one-hot: pure flow matching, the classifier is unused
        return fm, (state, {"fm": fm})
    ce = cross_entropy(dense(params["classifier"], z_t + (1 - t) * v), y)
    return fm + ce, (state, {"fm": fm, "ce": ce})


def euler_chain(z0, v_fn, steps):
    """Forward Euler on dz/dt = v(t, z) from t = 0 to 1 in `steps` steps (our integrator choice)."""
    def step(z, t):
        return z + v_fn(t, z) / steps, None

    return jax.lax.scan(step, z0, jnp.arange(steps) / steps)[0]


def nearest_embedding(z, W):
    """argmin_y |z - u_y| (Sec. 2.3.1). z (B, d), W (m, d) -> (B,)."""
    return jnp.argmin((W ** 2).sum(-1) - 2 * z @ W.T, -1)


def flow(model, feats, W, image_shape):
    """v(t, z) = continuous_logits @ W_embed, one t for the batch: FM's velocity, the adjoint's vector field."""
    return lambda t, z: continuous_logits(model, feats, z, jnp.full((1,), t), image_shape) @ W


def predict_fm(params, state, key, x, steps=1000):
    """Probability-flow ODE from z_0 ~ N(0, I) by Euler, image features once; nearest embedding."""
    W, model = class_embeddings(params), params["model"]
    z0 = jax.random.normal(key, (x.shape[0], W.shape[1]))
    return nearest_embedding(euler_chain(z0, flow(model, continuous_features(model, x), W, x.shape[1:]), steps), W)


# --- Backprop baseline (Eqs. 17-19): the same T blocks chained end to end, trained by backprop ---

BACKPROP_A_INIT = 0.5  # NOT SPECIFIED: a_t = tanh(w_t) at init (a_t = 0 would give the blocks no gradient)
# NOT SPECIFIED: the classifier's init. z_T sits near the class embeddings (each block outputs softmax @ W_embed);
# a random classifier can give two classes the same corner, which the saturated chain never separates (MNIST: two
# digits at ~0 % recall after 10 epochs). So it starts as BACKPROP_CLS_SCALE * pinv(W_embed), zero bias; 0 = random.
BACKPROP_CLS_SCALE = 5.0


def init_backprop(key, image_shape, m, embedding="onehot", x=None, y=None, T=10, cls_scale=BACKPROP_CLS_SCALE,
                  block=CNN_BLOCK):
    """init_dt plus the mixing weights w_t of Eq. 18, and the classifier init above."""
    params, state = init_dt(key, image_shape, m, embedding, x, y, T, block)
    params["w"] = jnp.full((T,), math.atanh(BACKPROP_A_INIT), jnp.float32)  # not weak-typed: one compile
    if cls_scale:
        params["classifier"] = {"W": cls_scale * jnp.linalg.pinv(class_embeddings(params)), "b": jnp.zeros(m)}
    return params, state


def backprop_chain(params, state, x, z0, drop_keys=None, block=CNN_BLOCK):
    """Eq. 18: z_t = (1 - a_t) z_{t-1} + a_t u_hat_t(z_{t-1}, x), a_t = tanh(w_t), as a lax.scan (unrolled: T is
    small, and the unrolled chain runs ~1.6x faster on a CPU and on a GPU, bench/README.md).

    drop_keys (T, 2) for training, None for evaluation. Returns (z_T, new BN state).
    """
    W = class_embeddings(params)

    def step(z, inp):
        theta, bn, w, k = inp
        logits, bn = block[1](theta, bn, x, z, k)
        return (1 - jnp.tanh(w)) * z + jnp.tanh(w) * (jax.nn.softmax(logits) @ W), bn

    return jax.lax.scan(step, z0, (params["blocks"], state, params["w"], drop_keys), unroll=True)


def loss_backprop(params, state, key, x, y, block=CNN_BLOCK):
    """Cross-entropy of p(y | z_T) (Eq. 19) through the whole chain: gradients cross all blocks."""
    k0, k_drop = jax.random.split(key)
    z0 = jax.random.normal(k0, (x.shape[0], class_embeddings(params).shape[1]))
    zT, state = backprop_chain(params, state, x, z0, jax.random.split(k_drop, params["w"].shape[0]), block)
    ce = cross_entropy(dense(params["classifier"], zT), y)
    return ce, (state, {"ce": ce})


def predict_backprop(params, state, key, x, block=CNN_BLOCK):
    """argmax p(y | z_T) after the chain from z_0 ~ N(0, I), from images alone."""
    z0 = jax.random.normal(key, (x.shape[0], class_embeddings(params).shape[1]))
    return jnp.argmax(dense(params["classifier"], backprop_chain(params, state, x, z0, None, block)[0]), -1)


# --- Adjoint baseline (Sec. 4, Table 1): a neural ODE trained by the adjoint method (Chen et al. 2018) ---

def odeint_adjoint(f, z0, args, steps):
    """z(1) of dz/dt = f(z, t, args) from z(0) = z0 by `steps` Euler steps; gradients by the adjoint ODE.

    The backward pass stores nothing per step: it integrates z back from z(1), the adjoint
    a(t) = dL/dz(t) by da/dt = -a df/dz, and dL/dargs = int a df/dargs dt, on the same grid.
    Memory is constant in `steps`; the gradient equals backprop through the solver up to O(1/steps).
    """
    h, ts = 1.0 / steps, jnp.arange(steps) / steps

    @jax.custom_vjp
    def solve(z0, args):
        return euler_chain(z0, lambda t, z: f(z, t, args), steps)

    def forward(z0, args):
        z1 = solve(z0, args)
        return z1, (z1, args)

    def backward(res, a1):
        z1, args = res

        def step(carry, t):
            z, a, g = carry
            z = z - h * f(z, t, args)  # back along the trajectory: z(t) from z(t + h)
            _, vjp = jax.vjp(lambda z_, args_: f(z_, t, args_), z, args)
            dz, dargs = vjp(a)
            return (z, a + h * dz, jax.tree.map(lambda g_, d: g_ + h * d, g, dargs)), None

        zero = jax.tree.map(jnp.zeros_like, args)
        (_, a0, g), _ = jax.lax.scan(step, (z1, a1, zero), ts[::-1])
        return a0, g

    solve.defvjp(forward, backward)
    return solve(z0, args)


init_adjoint = init_fm  # the same model, classifier and W_embed; no noise schedule (the ODE has none)


def loss_adjoint(params, state, key, x, y, steps=1000):
    """CE of the linear classifier on z(1), z(0) ~ N(0, I) (our choice), T = steps in training too."""
    k0, k_drop = jax.random.split(key)
    W = class_embeddings(params)
    args = {"model": params["model"], "feats": continuous_features(params["model"], x, k_drop), "W": W}
    field = lambda z, t, a: flow(a["model"], a["feats"], a["W"], x.shape[1:])(t, z)  # noqa: E731
    z1 = odeint_adjoint(field, jax.random.normal(k0, (x.shape[0], W.shape[1])), args, steps)
    ce = cross_entropy(dense(params["classifier"], z1), y)
    return ce, (state, {"ce": ce})


def predict_adjoint(params, state, key, x, steps=1000):
    """argmax of the classifier on z(1), integrated by Euler from z(0) ~ N(0, I), features once."""
    W, model = class_embeddings(params), params["model"]
    z0 = jax.random.normal(key, (x.shape[0], W.shape[1]))
    z1 = euler_chain(z0, flow(model, continuous_features(model, x), W, x.shape[1:]), steps)
    return jnp.argmax(dense(params["classifier"], z1), -1)


# --- The training step: Algorithm 1 for all blocks at once ---

def train_step(params, state, opt_state, key, x, y, *, loss_fn, optimizer):
    """One optimiser step on loss_fn(params, state, key, x, y) -> (loss, (state, aux)).

    For DT, loss_fn is loss_dt, the sum of the T blocks' L_t. Block t's parameters appear only in L_t
    (its input is a stop_gradient sample), so one value_and_grad gives every block exactly its own
    gradient: the T updates of Algorithm 1 in one step, without back-propagation between blocks.
    """
    (loss, (state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, key, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss, aux
