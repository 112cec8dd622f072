"""The specification: each test pins one equation of the paper, or one way an implementation of it
goes wrong, against an independent form; then one short end-to-end run per variant on real MNIST.

The harness's own tests live beside it: harness/test_*.py, bench/test_bench.py, results/test_results.py.
"""
import functools
import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import noprop
from harness import data, loop, variants
from harness.testing import DATA, TMP, needs_mnist
from viz.figures import restore

pytest_plugins = ["harness.testing"]
KEY = jax.random.PRNGKey(0)
TINY = (16, 16, 1)  # smallest image the valid-conv stack accepts: 16 -> 14 -> 7 -> 5 -> 3 -> 1


def random_schedule(key, T):
    """An arbitrary increasing alpha_bar in (0, 1), to test the formulas beyond the cosine."""
    return noprop.schedule_from_alpha_bar(jnp.sort(jax.random.uniform(key, (T + 1,), minval=0.01, maxval=0.99)))


# --- Schedule and q (Eqs. 3, 5, 6; App. A.3-A.4) ---

def test_schedule_runs_noise_to_label_with_positive_weights():
    """alpha_bar increases with t (z_T is the label): the reverse of DDPM's index, the commonest slip."""
    s = noprop.cosine_schedule(10)
    ab = np.asarray(s["alpha_bar"])
    assert np.all(np.diff(ab) > 0) and 0 < ab[0] < 0.01 and 0.99 < ab[-1] < 1
    assert np.all(np.diff(np.asarray(s["snr"])) > 0)  # every (T/2) eta dSNR(t) weight > 0
    assert np.all(np.asarray(s["a"]) > 0) and np.all(np.asarray(s["c"]) > 0)


def test_eq6_alpha_bar_is_product_from_t_to_T():
    s = noprop.cosine_schedule(10)
    prods = [np.prod(np.asarray(s["alpha"])[t:]) for t in range(11)]
    np.testing.assert_allclose(prods, s["alpha_bar"], rtol=1e-5)


def test_q_samples_have_the_variance_preserving_moments():
    u = jnp.array([1.0, 0.0, -2.0, 0.5])
    for ab in (0.05, 0.5, 0.95):
        z = noprop.sample_q(KEY, jnp.broadcast_to(u, (200_000, 4)), ab)
        np.testing.assert_allclose(z.mean(0), np.sqrt(ab) * u, atol=0.01)
        np.testing.assert_allclose(z.var(0), 1 - ab, rtol=0.02)


@pytest.mark.parametrize("sched", [noprop.cosine_schedule(10), random_schedule(KEY, 7)])
def test_a_b_c_are_the_gaussian_posterior(sched):
    """q(z_t|z_{t-1},y) from q(z_{t-1}|z_t) = N(sqrt(al_{t-1}) z_t, 1-al_{t-1}) and q(z_t|y) (Eqs. 5-6)."""
    ab, al = np.asarray(sched["alpha_bar"], np.float64), np.asarray(sched["alpha"], np.float64)
    prec = al[:-1] / (1 - al[:-1]) + 1 / (1 - ab[1:])  # posterior precision of z_t
    np.testing.assert_allclose(sched["c"], 1 / prec, rtol=1e-4)
    np.testing.assert_allclose(sched["a"], np.sqrt(ab[1:]) / (1 - ab[1:]) / prec, rtol=1e-4)
    np.testing.assert_allclose(sched["b"], np.sqrt(al[:-1]) / (1 - al[:-1]) / prec, rtol=1e-4)
    # App. A.4: the KL between Eq. 3 steps is a_t^2/(2 c_t) |u_hat - u|^2 = (SNR(t) - SNR(t-1))/2 |.|^2
    np.testing.assert_allclose(np.asarray(sched["a"]) ** 2 / sched["c"], np.diff(sched["snr"]), rtol=1e-3)


def test_kl_z0_matches_the_gaussian_kl():
    u, ab0 = jnp.array([[0.3, -1.0, 2.0]]), 0.2
    mu, var = np.sqrt(ab0) * u, 1 - ab0
    expected = 0.5 * np.sum(var + mu ** 2 - 1 - np.log(var))
    np.testing.assert_allclose(noprop.kl_z0(u, ab0), [expected], rtol=1e-5)


@pytest.mark.parametrize("sched", [noprop.cosine_schedule(10), random_schedule(KEY, 5)])
def test_oracle_chain_reproduces_q_marginals_and_ends_at_label(sched):
    """With u_hat = u_y, Eq. 3 from z_0 ~ N(0, I) must give z_t ~ q(z_t|y) at every t."""
    u = jnp.array([1.0, -1.0, 0.5])
    n, T = 100_000, sched["a"].shape[0]
    k0, k1 = jax.random.split(KEY)
    z0 = noprop.sample_q(k0, jnp.broadcast_to(u, (n, 3)), sched["alpha_bar"][0])
    _, path = noprop.eq3_chain(k1, z0, sched, lambda _, z: u, jnp.arange(T))
    ab = np.asarray(sched["alpha_bar"][1:])[:, None]
    np.testing.assert_allclose(path.mean(1), np.sqrt(ab) * u, atol=0.015)
    np.testing.assert_allclose(path.var(1), np.broadcast_to(1 - ab, (T, 3)), atol=0.015)


# --- Layers and architecture (valid convs, exact parameter counts) ---

def test_conv_and_pool_match_lax():
    x = jax.random.normal(KEY, (2, 9, 7, 3))
    p = noprop.init_conv(KEY, 3, 5)
    ref = jax.lax.conv_general_dilated(x, p["W"], (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b"]
    np.testing.assert_allclose(noprop.conv3x3(p, x), ref, atol=1e-5)
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(noprop.maxpool2(x), ref)


def test_batchnorm_train_and_eval_modes_and_dropout():
    p, s = noprop.init_batchnorm(3)
    x = jax.random.normal(KEY, (64, 3)) * 4 + 2
    y, s1 = noprop.batchnorm(p, s, x, train=True)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s1["mean"], 0.1 * x.mean(0), rtol=1e-5)  # momentum 0.1
    np.testing.assert_allclose(s1["var"], 0.9 + 0.1 * np.var(np.asarray(x), 0, ddof=1), rtol=1e-5)  # unbiased: n/(n-1)
    y_eval, s2 = noprop.batchnorm(p, s1, x, train=False)
    assert s2 is s1 and not np.allclose(y_eval, y)  # eval uses running statistics
    assert noprop.dropout(None, x) is x
    kept = noprop.dropout(KEY, jnp.ones(100_000))
    assert abs(float((kept == 0).mean()) - 0.2) < 0.01 and abs(float(kept.mean()) - 1) < 0.01
    np.testing.assert_allclose(np.unique(np.asarray(kept)), [0.0, 1 / 0.8], rtol=1e-6)  # inverted: kept ones / (1 - p)


PAPER_COUNTS = {  # v2 Table 5: (DT block, CT model) per dataset and embedding; matched exactly by valid convs
    ("mnist", "onehot"): (919_946, 867_722), ("mnist", "dim20"): (922_506, 870_282),
    ("mnist", "prototype"): (1_401_738, 1_482_122), ("cifar10", "onehot"): (1_215_434, 1_163_210),
    ("cifar10", "dim20"): (1_217_994, 1_165_770), ("cifar10", "prototype"): (1_992_714, 2_073_098),
    ("cifar100", "onehot"): (1_250_084, 1_197_860), ("cifar100", "dim20"): (1_229_604, 1_177_380),
    ("cifar100", "prototype"): (2_004_324, 2_084_708)}


@pytest.mark.parametrize("dataset,embedding", PAPER_COUNTS)
def test_parameter_counts_match_paper_with_valid_convs(dataset, embedding):
    shape, m = data.DATASETS[dataset]
    d = noprop.embedding_dim(embedding, shape, m)
    dt, _ = jax.eval_shape(lambda k: noprop.init_dt_block(k, shape, d, m), KEY)
    ct = jax.eval_shape(lambda k: noprop.init_continuous(k, shape, d, m), KEY)
    assert (noprop.count_params(dt), noprop.count_params(ct)) == PAPER_COUNTS[dataset, embedding]


def test_parameters_are_strongly_typed_float32_so_the_train_step_compiles_once():
    # a weak-typed leaf (jnp.array(python float)) comes back from the first step strongly typed,
    # and jit then compiles the whole training step a second and a third time
    for init in (functools.partial(noprop.init_dt, embedding="dim20", T=2), noprop.init_backprop, noprop.init_ct):
        params, _ = jax.eval_shape(lambda k: init(k, TINY, 4), KEY)  # types without computing anything
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            assert leaf.dtype == jnp.float32 and not leaf.weak_type, jax.tree_util.keystr(path)


def test_embeddings_orthogonal_and_medoid_and_figure_7s_inits_of_their_norm():
    W = noprop.init_embedding(KEY, "dim20", 10, (28, 28, 1))["W_embed"]
    np.testing.assert_allclose(W @ W.T, np.eye(10), atol=1e-5)
    x = np.array([[0.0], [1.0], [1.1], [5.0], [3.0], [3.2], [9.0]]).reshape(7, 1, 1, 1)
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(noprop.medoid_images(x, y, 2)[:, 0], [1.0, 3.2])
    x = np.array([0.0, 1.0, 2.1, 3.0, 100.0]).reshape(5, 1, 1, 1)  # the median, not the mean, of the distances:
    assert float(noprop.medoid_images(x, np.zeros(5, int), 1)[0, 0]) == 1.0  # the mean would pick 2.1 (the outlier)
    x, y = jax.random.uniform(KEY, (40, 4, 4, 1)), np.arange(40) % 4  # d = 16 = image size
    medoids = noprop.init_embedding(KEY, "prototype", 4, (4, 4, 1), x, y)["W_embed"]
    norm = float(jnp.linalg.norm(medoids, axis=1).mean())
    for init in ("orthogonal", "random"):
        W = noprop.init_embedding(KEY, "prototype", 4, (4, 4, 1), x, y, init)["W_embed"]
        np.testing.assert_allclose(jnp.linalg.norm(W, axis=1), norm, rtol=1e-5)  # other directions, same norm
        gram = np.asarray(W @ W.T) / norm ** 2
        assert (np.abs(gram - np.eye(4)).max() < 1e-5) == (init == "orthogonal")


def test_posterior_classifier_is_eq16_and_sure_of_an_exact_embedding():
    params = {"classifier": noprop.init_dense(KEY, 10, 10)}  # one-hot: W_embed = I
    z, W = jax.random.normal(KEY, (5, 10)), jnp.eye(10)
    y_tilde = jax.nn.softmax(noprop.dense(params["classifier"], z)) @ W  # Eq. 15
    want = jax.nn.log_softmax(-((y_tilde[:, None] - W[None]) ** 2).sum(-1) / (2 * noprop.POSTERIOR_SIGMA ** 2))  # Eq. 16
    np.testing.assert_allclose(jax.nn.log_softmax(noprop.posterior_logits(params, z)), want, rtol=1e-5, atol=1e-5)
    sure = {"classifier": {"W": jnp.zeros((10, 10)), "b": 50.0 * jnp.eye(10)[3]}}  # y~ = u_3 exactly
    assert float(jax.nn.softmax(noprop.posterior_logits(sure, z))[:, 3].min()) > 0.99
    v = variants.dt(classifier="posterior")  # the flag reaches the loss and the chain's readout
    assert v.loss.keywords["classifier"] is v.predict.keywords["classifier"] is noprop.posterior_logits


# --- DT objective (Eq. 8 / Eq. 61), the blocks, and the backprop baseline (Eqs. 17-19) ---
# (map_blocks loops over the blocks on one CPU and vmaps them elsewhere; `form` fixtures run both: same numbers)


@pytest.fixture(params=["vmap", "loop"])
def form(request, monkeypatch):
    """The two forms of noprop.map_blocks: told of another backend, it maps the blocks by jax.vmap, as on a GPU."""
    if request.param == "vmap":
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    return request.param

def tiny_dt(T=3, embedding="onehot"):
    params, state = noprop.init_dt(KEY, TINY, 4, embedding, T=T)
    x = jax.random.uniform(KEY, (8,) + TINY)
    return params, state, x, jnp.arange(8) % 4, noprop.cosine_schedule(T)


@pytest.mark.parametrize("block", ["cnn", "mlp"])
def test_block_t_loss_has_zero_gradient_for_every_other_block(block, form):
    """Any block (an init/apply pair), either compile form: theta_t gets dL_t only, the shared classifier and
    W_embed every L_t."""
    b = variants.BLOCKS[block]
    params, state = noprop.init_dt(KEY, TINY, 4, "dim20", T=3, block=b)
    x, y, sched = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4, noprop.cosine_schedule(3)
    jac = jax.jit(jax.jacrev(lambda p: noprop.loss_dt(p, state, KEY, x, y, sched, block=b)[1][1]["L_t"]))(params)
    for t in range(3):  # jac leaves: (L_t index, block index, ...)
        for s in range(3):
            norm = sum(float(jnp.abs(leaf[t, s]).sum()) for leaf in jax.tree.leaves(jac["blocks"]))
            assert (norm > 0) == (s == t), (t, s, norm)
        for shared in ("classifier", "W_embed"):  # shared parts: trained by every L_t
            assert sum(float(jnp.abs(leaf[t]).sum()) for leaf in jax.tree.leaves(jac[shared])) > 0


def probe_block(scale=3.0):
    """A DT block (an init/apply pair) with no image path: logits = scale * z_{t-1} + c_t, each block's c_t its own,
    so the blocks' outputs differ and each block's term is seen alone. Needs d = m (one-hot)."""
    return (lambda key, image_shape, d, m: ({"c": jax.random.normal(key, (m,))}, {}),
            lambda p, s, x, z, key=None: (scale * z[:, :p["c"].shape[-1]] + p["c"], s))


def q_samples(rng, y, ab, d, n_rep=1):
    """z ~ q(z|y) = N(sqrt(ab) u_y, (1 - ab) I) for one-hot u_y, drawn by numpy: (n_rep * B, d), and the labels."""
    y = np.tile(np.asarray(y), n_rep)
    return np.sqrt(ab) * np.eye(d)[y] + np.sqrt(1 - ab) * rng.standard_normal((len(y), d)), y


def np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_cross_entropy(logits, y):
    return float(np.mean(np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
                         - logits[np.arange(len(y)), y]))


def test_one_optimiser_step_moves_block_t_by_its_own_L_t_alone(form):
    """Through the scripts' compiled step and optimiser (AdamW): block t's update from sum_t L_t equals its update
    from L_t alone. A step that mixed blocks (a global-norm clip, say) would fail this."""
    v = variants.dt(T=3, block="mlp")  # the MLP block compiles faster; isolation is the step's, not the block's
    params, state = v.init(KEY, TINY, 4, "dim20")
    x, y = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4

    def only(t):  # L_t of block t alone, the others' terms held out of the loss
        def loss(*a):
            _, (st, aux) = v.loss(*a)
            return aux["L_t"][t], (st, aux)
        return loss

    opt_state = v.optimizer.init(params)
    step = loop.jit_step(v.loss, v.optimizer)
    full = step(params, state, opt_state, KEY, x, y)[0]["blocks"]
    for t in range(3):
        alone = loop.jit_step(only(t), v.optimizer)(params, state, opt_state, KEY, x, y)[0]["blocks"]
        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(alone)):
            np.testing.assert_allclose(a[t], b[t], rtol=1e-5, atol=1e-7)


def test_eq8_each_block_t_learns_at_its_own_noise_level_with_its_own_weight():
    """L_t = CE(p(y|z_T)) + KL(q(z_0|y)||N(0,I)) + (T/2) eta (SNR(t) - SNR(t-1)) E|u_hat_t(z_{t-1}) - u_y|^2 with
    z_{t-1} ~ q(z_{t-1}|y): each block's term against a numpy Monte Carlo at alpha_bar_{t-1}, blocks that differ."""
    T, m, n, eta = 3, 4, 20_000, 0.3
    block = probe_block()
    params, state = noprop.init_dt(KEY, TINY, m, T=T, block=block)
    params["classifier"] = {"W": 3.0 * jnp.eye(m), "b": jnp.zeros(m)}
    x, y, sched = jnp.zeros((n,) + TINY), jnp.arange(n) % m, noprop.cosine_schedule(T)
    loss = jax.jit(lambda eta: noprop.loss_dt(params, state, KEY, x, y, sched, eta, block=block))
    (total, (_, aux)), (_, (_, aux0)) = loss(eta), loss(0.0)
    c = np.asarray(params["blocks"]["c"])
    ab, snr = np.asarray(sched["alpha_bar"], np.float64), np.asarray(sched["snr"], np.float64)
    rng = np.random.default_rng(0)
    for t in range(1, T + 1):  # block t's denoising error at its input level alpha_bar_{t-1}
        z, yy = q_samples(rng, y, ab[t - 1], m)
        want = np.mean(((np_softmax(3.0 * z + c[t - 1]) - np.eye(m)[yy]) ** 2).sum(-1))
        np.testing.assert_allclose(aux["l2"][t - 1], want, rtol=0.03, err_msg=f"block {t}")
    # the weight of each block's term, exactly: (T/2) eta (SNR(t) - SNR(t-1))
    np.testing.assert_allclose(aux["L_t"] - aux0["L_t"], T / 2 * eta * np.diff(snr) * np.asarray(aux["l2"]), rtol=1e-4)
    np.testing.assert_allclose(float(total), float(aux["L_t"].sum()), rtol=1e-6)  # the step minimises sum_t L_t
    # KL(q(z_0|y) || N(0, I)) at alpha_bar_0, the Gaussian KL written out; CE of p(y|z_T), z_T ~ q(z_T|y)
    kl = 0.5 * m * ((1 - ab[0]) + ab[0] / m - 1 - np.log(1 - ab[0]))  # sum over dims of var + mu^2 - 1 - log var
    np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-4)
    z, yy = q_samples(rng, y, ab[T], m)
    np.testing.assert_allclose(aux0["L_t"] - kl, np_cross_entropy(3.0 * z, yy), rtol=0.03)


def test_block_input_is_a_sample_that_carries_no_gradient_to_w_embed():
    """Algorithm 1 samples z_{t-1} ~ q(z_{t-1}|y) as data: W_embed's gradient is that of a block that stops it itself."""
    init, apply = probe_block()
    stopped = (init, lambda p, s, x, z, key=None: apply(p, s, x, jax.lax.stop_gradient(z), key))
    params, state = noprop.init_dt(KEY, TINY, 4, "dim20", T=3, block=(init, apply))
    x, y, sched = jnp.zeros((8,) + TINY), jnp.arange(8) % 4, noprop.cosine_schedule(3)
    grads = [jax.grad(lambda p: noprop.loss_dt(p, state, KEY, x, y, sched, block=b)[0])(params)["W_embed"]
             for b in ((init, apply), stopped)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_eq3_runs_block_t_on_z_t_minus_1_with_its_own_coefficients():
    """dt_chain without eps against the recurrence written out, blocks that differ: z_t = a_t u_hat_t(z_{t-1}) + b_t z_{t-1}."""
    T, m = 4, 4
    block = probe_block(1.5)
    params, state = noprop.init_dt(KEY, TINY, m, T=T, block=block)
    sched, x = random_schedule(KEY, T), jnp.zeros((6,) + TINY)
    zT, path = noprop.dt_chain(params, state, KEY, x, sched, stochastic=False, block=block)
    z, c = np.asarray(path[0], np.float64), np.asarray(params["blocks"]["c"])
    a, b = np.asarray(sched["a"]), np.asarray(sched["b"])
    for t in range(T):
        z = a[t] * np_softmax(1.5 * z + c[t]) + b[t] * z
        np.testing.assert_allclose(path[t + 1], z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(zT, z, rtol=1e-4, atol=1e-5)


def test_backprop_baseline_sends_gradient_through_every_block_and_it_is_the_loss_gradient():
    params, state = noprop.init_backprop(KEY, TINY, 4, T=3)
    x, y = jax.random.uniform(KEY, (16,) + TINY), jnp.arange(16) % 4
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p: noprop.loss_backprop(p, state, KEY, x, y)[0]))
    loss, g = loss_and_grad(params)
    for s in range(3):  # unlike NoProp's L_t: the one loss reaches every block and every w_t
        assert sum(float(jnp.abs(leaf[s]).sum()) for leaf in jax.tree.leaves(g["blocks"])) > 0
    assert bool(jnp.all(g["w"] != 0))
    # a small step along -g lowers the end-to-end loss by |g| * step to first order (same dropout
    # mask and batch): the gradient is that of the whole chain, so ordinary backprop trains it
    norm = float(jnp.sqrt(sum((leaf ** 2).sum() for leaf in jax.tree.leaves(g))))
    step = 1e-2
    moved = jax.tree.map(lambda p, d: p - step / norm * d, params, g)
    np.testing.assert_allclose(float(loss - loss_and_grad(moved)[0]), step * norm, rtol=0.2)


def test_eq18_backprop_chain_is_the_mixing_recurrence():
    """z_t = (1 - a_t) z_{t-1} + a_t u_hat_t(z_{t-1}, x), a_t = tanh(w_t), written out, blocks and w_t that differ."""
    T, m = 3, 4
    block = probe_block(2.0)
    params, state = noprop.init_backprop(KEY, TINY, m, T=T, block=block)
    params["w"] = jnp.array([0.3, -0.8, 1.7])
    z0 = jax.random.normal(KEY, (6, m))
    zT, _ = noprop.backprop_chain(params, state, jnp.zeros((6,) + TINY), z0, block=block)
    z, c = np.asarray(z0, np.float64), np.asarray(params["blocks"]["c"])
    for t in range(T):
        a = np.tanh(float(params["w"][t]))
        z = (1 - a) * z + a * np_softmax(2.0 * z + c[t])
    np.testing.assert_allclose(zT, z, rtol=1e-4, atol=1e-5)


def test_map_blocks_loop_computes_what_vmap_computes(monkeypatch):
    """noprop.map_blocks: the loop over the blocks (one CPU) is the same map as jax.vmap (elsewhere): loss, BN state,
    per-block terms, gradients and the chain's predictions."""
    params, state, x, y, sched = tiny_dt(embedding="dim20")
    outs = {}
    for form in ("loop", "vmap"):
        if form == "vmap":
            monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        grad = jax.value_and_grad(lambda p: noprop.loss_dt(p, state, KEY, x, y, sched), has_aux=True)
        (value, (new_state, aux)), g = jax.jit(grad)(params)
        outs[form] = (value, new_state, aux, g, jax.jit(noprop.predict_dt)(params, state, KEY, x, sched))
    (v1, s1, a1, g1, p1), (v2, s2, a2, g2, p2) = outs["vmap"], outs["loop"]
    assert float(v1) > 0 and sum(float(jnp.abs(leaf).sum()) for leaf in jax.tree.leaves(g1["blocks"])) > 0
    # float tolerance, on the scale of all the gradients (biases before batch norm have gradient 0 in exact
    # math and float noise here) and of each other array
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves((v1, s1, a1)), jax.tree.leaves((v2, s2, a2))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_array_equal(p1, p2)


def adjoint_problem(steps, adjoint):
    """CE after the adjoint baseline's ODE on a tiny problem, by the adjoint method or by backprop through Euler."""
    params, _ = noprop.init_adjoint(KEY, TINY, 4, "dim20")
    field = lambda z, t, a: noprop.flow(a["model"], a["feats"], a["W"], TINY)(t, z)  # noqa: E731
    x, y = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4

    def loss(p):
        W = noprop.class_embeddings(p)
        args = {"model": p["model"], "feats": noprop.continuous_features(p["model"], x), "W": W}
        z0 = jax.random.normal(KEY, (8, W.shape[1]))
        if adjoint:
            z1 = noprop.odeint_adjoint(field, z0, args, steps)
        else:
            z1 = noprop.euler_chain(z0, lambda t, z: field(z, t, args), steps)
        return noprop.cross_entropy(noprop.dense(p["classifier"], z1), y)

    return jax.jit(jax.value_and_grad(loss)).lower(params).compile(), params


def test_adjoint_gradient_equals_backprop_through_the_solver():
    (l1, g1), (l2, g2) = (c(p) for c, p in (adjoint_problem(50, True), adjoint_problem(50, False)))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for part in ("model", "classifier", "W_embed"):  # the field's weights, the readout and W_embed all learn
        a, b = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(g[part])]) for g in (g1, g2))
        assert np.abs(b).max() > 0 and np.linalg.norm(a - b) < 1e-3 * np.linalg.norm(b), part


def test_adjoint_memory_does_not_grow_with_the_step_count():
    temp = {(s, adj): adjoint_problem(s, adj)[0].memory_analysis().temp_size_in_bytes
            for s in (100, 1000) for adj in (True, False)}
    assert temp[1000, True] < 1.2 * temp[100, True]  # the adjoint stores no trajectory
    assert temp[1000, False] > 3 * temp[100, False]  # backprop through the solver stores all of it


def test_variants_table_defaults_are_the_scripts_and_the_papers():
    """One table (harness.variants) builds what every script, benchmark and restore trains: its defaults are
    Table 4's, as the scripts' flags state them."""
    import train_ct, train_dt, train_fm
    for build, script, keys in ((variants.dt, train_dt, ("T", "eta", "block", "lr", "weight_decay")),
                                (variants.ct, train_ct, ("eta", "steps", "clip", "lr", "weight_decay", "schedule", "label_scale",
                                                          "log_snr_init", "sampler")),
                                (variants.fm, train_fm, ("steps", "lr", "weight_decay"))):
        defaults = {k: p.default for k, p in inspect.signature(build).parameters.items()}
        assert {k: script.DEFAULTS[k] for k in keys} == {k: defaults[k] for k in keys}, script.__name__
    assert set(variants.VARIANTS) == {"dt", "backprop", "ct", "adjoint", "fm"}


# --- Evaluation sees only images: labels never reach inference ---

def test_prediction_functions_take_no_labels():
    for fn in (noprop.predict_dt, noprop.predict_ct, noprop.predict_fm, noprop.predict_backprop, noprop.predict_adjoint):
        assert not {"y", "labels", "y_test"} & set(inspect.signature(fn).parameters)


# --- End to end on real MNIST: each variant learns, and the ablations hurt ---
# Each run is the script as a user starts it, in a process of its own (on the second core, while the tests
# above run); a test then reads its record and checkpoint. T = 2, lr 2e-3 and batch 16 keep DT short: the
# classifier p(y|z_T) needs ~250 such steps (DT: 86-91 % over three seeds). 1000 test images, and no train
# accuracy (--train-eval 0): evaluation is most of a short run's time.

SLICE = ["--data-dir", DATA, "--offline", "--lr", "2e-3", "--train-limit", "2048", "--test-limit", "1000", "--train-eval", "0",
         "--quiet"]
DT_SLICE = [*SLICE, "--T", "2", "--batch-size", "16", "--epochs", "2", "--eval-runs", "2"]
DT_RUN = ("dt_slice", ["train_dt.py", *DT_SLICE, "--out", TMP + "/dt.json", "--checkpoint-dir", TMP + "/dt"])


def finished_run(r, name):
    """The record and the restored (params, state) of a script run by a `subprocess` marker."""
    assert r.returncode == 0, r.stderr[-3000:]
    folder = os.path.dirname(r.args[r.args.index("--out") + 1])
    _, _, tree, _, (_, _, x_te, y_te) = restore(os.path.join(folder, name, "checkpoint.npz"), DATA)
    return json.load(open(os.path.join(folder, f"{name}.json"))), tree, x_te[:1000], y_te[:1000]


@needs_mnist
@pytest.mark.subprocess(*DT_RUN)
def test_dt_learns_mnist_slice_and_ablations_hurt(subprocess_result):
    record, tree, x_te, y_te = finished_run(subprocess_result("dt_slice"), "dt")
    assert record["test_acc_mean"] > 0.7, record  # chance is 0.1
    assert "train_accs" not in record and "train_acc" not in record["history"][-1]  # --train-eval 0: test images only
    params, state, sched = tree["eval"], tree["state"], noprop.cosine_schedule(2)
    predict = jax.jit(noprop.predict_dt)  # one compile for all four calls: same shapes, same tree

    def acc(W, s, labels=y_te):  # W: the one-hot embedding (fixed, so not in params), or an ablation
        return float(jnp.mean(predict({**params, "W_embed": W}, state, KEY, x_te, s) == labels))

    assert acc(jnp.eye(10), sched) > 0.7
    assert acc(jnp.eye(10), sched, np.random.default_rng(0).permutation(y_te)) < 0.2  # shuffled labels
    assert acc(jnp.zeros((10, 10)), sched) < 0.3  # a zero embedding carries no label
    assert acc(jnp.eye(10), {**sched, "a": jnp.zeros(2)}) < 0.3  # the chain without the blocks' u_hat


@needs_mnist
@pytest.mark.subprocess(*DT_RUN)
@pytest.mark.subprocess("backprop_slice", ["train_dt.py", *DT_SLICE, "--method", "backprop", "--out", TMP + "/bp.json"])
def test_backprop_baseline_learns_every_class_and_matches_dt_on_the_same_slice(subprocess_result):
    r = subprocess_result("backprop_slice")
    assert r.returncode == 0, r.stderr[-3000:]
    record, dt = (json.load(open(os.path.join(os.path.dirname(r.args[-1]), f))) for f in ("bp.json", "dt.json"))
    # with a random classifier init, 4 of 10 digits ended at ~0 % recall here (seed 0: 49.8 %);
    # with 5 pinv(W_embed) every class is learned (89.6 % and 91.4 % over seeds 0-1, min recall 0.70)
    assert min(record["test_class_recall"]) > 0.3, record["test_class_recall"]
    assert record["test_acc_mean"] > dt["test_acc_mean"] - 0.08, (record["test_acc_mean"], dt["test_acc_mean"])


@needs_mnist
@pytest.mark.subprocess("ct_slice", ["train_ct.py", *SLICE, "--batch-size", "32", "--epochs", "8", "--steps", "20",
                                     "--eval-runs", "1", "--out", TMP + "/ct.json", "--checkpoint-dir", TMP + "/ct"])
def test_ct_learns_mnist_slice_without_collapse_at_few_steps_and_zero_embedding_hurts(subprocess_result):
    record, tree, x_te, y_te = finished_run(subprocess_result("ct_slice"), "ct")
    predict = jax.jit(noprop.predict_ct, static_argnums=4)

    def acc(W, steps):  # W: the one-hot embedding (fixed, so not in params), or an ablation
        return float(jnp.mean(predict({**tree["eval"], "W_embed": W}, {}, KEY, x_te, steps) == y_te))

    # 512 steps: with clipping and the weight average (the defaults) 92.0 / 91.8 / 91.2 % over seeds 0-2, rising
    # every epoch; clipped, raw weights: 88.8 / 91.2 / 90.6 % over seeds 0-2, with falls of up to 6 points;
    # neither: 59.0 / 68.8 / 49.8 %, falls of up to 17 points between epochs. Chance is 10 %.
    history = [h["test_acc"] for h in record["history"]]
    assert all(b > a - 0.01 for a, b in zip(history, history[1:])), history  # steady: no fall over a point
    assert record["test_acc_mean"] > 0.75 and acc(jnp.eye(10), 5) > 0.5, record  # no collapse at 5 inference steps
    assert acc(jnp.zeros((10, 10)), 5) < 0.16  # zero embedding (at 5 steps too: one compile serves both)


@needs_mnist
@pytest.mark.subprocess("fm_slice", ["train_fm.py", *SLICE, "--embedding", "dim20", "--batch-size", "32", "--epochs", "6",
                                     "--steps", "20", "--eval-runs", "1", "--out", TMP + "/fm.json", "--checkpoint-dir", TMP + "/fm"])
def test_fm_dim20_learns_mnist_slice_and_embedding_does_not_collapse(subprocess_result):
    record, tree, _, _ = finished_run(subprocess_result("fm_slice"), "fm")
    W = np.asarray(tree["eval"]["W_embed"])
    dists = np.linalg.norm(W[:, None] - W[None], axis=-1)[~np.eye(10, dtype=bool)]
    assert record["test_acc_mean"] > 0.4, record  # chance 0.1 (64-78 % here after 384 steps, two compile modes)
    norms = np.linalg.norm(W, axis=1)  # init: unit rows at distance sqrt(2); training shrinks them all
    # together (to ~0.5 after 384 steps here), so separation is judged relative to their size (~0.9-1.0 here)
    assert norms.min() > 0.25 and dists.min() > 0.5 * norms.mean(), (norms, dists.min())


# --- NoProp-CT: learned schedule (App. B), Eq. 9, inference (Eq. 3 on a grid) ---

def test_learned_schedule_is_monotone_for_any_parameters():
    t = jnp.linspace(0.0, 1.0, 201)
    p0 = noprop.init_gamma(KEY)
    ab = noprop.alpha_bar_ct(p0, t)
    np.testing.assert_allclose([ab[0], ab[-1]], jax.nn.sigmoid(noprop.LOG_SNR_INIT * jnp.array([-1.0, 1.0])), rtol=1e-5)
    for i in range(20):  # arbitrary, large parameter values: still increasing alpha_bar and SNR
        k = jax.random.fold_in(KEY, i)
        p = jax.tree.map(lambda a, kk: 5 * jax.random.normal(kk, a.shape), p0,
                         dict(zip(p0, jax.random.split(k, len(p0)))))
        assert bool(jnp.all(noprop.snr_prime(p, t) > 0)) and bool(jnp.all(jnp.diff(noprop.alpha_bar_ct(p, t)) >= 0))


def test_app_b_ends_gamma_0_at_t_1_and_gamma_1_at_t_0_for_any_parameters():
    """Eqs. 66-67: gamma(0) = gamma_1 = gamma_0 + softplus(gap), gamma(1) = gamma_0; alpha_bar = sigmoid(-gamma) and
    SNR = exp(-gamma) (Eq. 65); init_ct's log_snr_init L puts log SNR at -L (t = 0) and +L (t = 1)."""
    p0 = noprop.init_gamma(KEY)
    for i in range(5):
        p = jax.tree.map(lambda a, k: 3 * jax.random.normal(k, a.shape), p0, dict(zip(p0, jax.random.split(jax.random.fold_in(KEY, i), len(p0)))))
        g0, g1 = float(p["gamma_0"]), float(p["gamma_0"]) + float(jax.nn.softplus(p["gap"]))
        np.testing.assert_allclose(noprop.gamma(p, jnp.array([0.0, 1.0])), [g1, g0], rtol=1e-5, atol=1e-5)
        ab = noprop.alpha_bar_ct(p, jnp.array([0.0, 0.3, 1.0]))
        np.testing.assert_allclose(ab / (1 - ab), np.exp(-noprop.gamma(p, jnp.array([0.0, 0.3, 1.0]))), rtol=1e-4)
    params, _ = noprop.init_ct(KEY, TINY, 4, log_snr_init=2.5)
    np.testing.assert_allclose(-noprop.gamma(params["schedule"], jnp.array([0.0, 1.0])), [-2.5, 2.5], rtol=1e-5)  # log SNR


def ct_constant_model(monkeypatch, logits_fn):
    """loss_ct / loss_fm with the network replaced by logits_fn(z_t, t): no image path, a known u_hat or v."""
    monkeypatch.setattr(noprop, "continuous_features", lambda p, x, key=None: jnp.zeros((x.shape[0], 1)))
    monkeypatch.setattr(noprop, "continuous_logits", lambda p, feats, z, t, shape, key=None: logits_fn(z, t))


def test_eq9_terms_against_quadrature_over_t_and_monte_carlo_over_z(monkeypatch):
    """Eq. 9 with u_hat = softmax(2 z_t): (eta/2) E_{t~U[0,1]} SNR'(t) E_z|u_hat - u_y|^2 against a fine quadrature
    over t (numpy Monte Carlo over z ~ q(z_t|y) at each t); CE read at z_1 ~ q(z_1|y); KL at alpha_bar(0)."""
    ct_constant_model(monkeypatch, lambda z, t: 2.0 * z)
    m, n, eta = 4, 40_000, 0.7
    params, _ = noprop.init_ct(KEY, TINY, m, log_snr_init=2.0)
    params["classifier"] = {"W": 3.0 * jnp.eye(m), "b": jnp.zeros(m)}
    x, y = jnp.zeros((n, 1, 1, 1)), jnp.arange(n) % m
    loss = jax.jit(lambda eta: noprop.loss_ct(params, {}, KEY, x, y, eta))
    (_, (_, aux)), (_, (_, aux0)) = loss(eta), loss(0.0)
    g = params["schedule"]
    snr = lambda t: np.exp(-np.asarray(noprop.gamma(g, jnp.asarray(t, jnp.float32)), np.float64))  # noqa: E731
    ts = np.linspace(0, 1, 2001)
    rng, eps = np.random.default_rng(0), np.random.default_rng(1).standard_normal((4000, m))
    u = np.eye(m)[np.arange(4000) % m]
    ab = snr(ts) / (1 + snr(ts))
    f = [np.mean(((np_softmax(2.0 * (np.sqrt(a) * u + np.sqrt(1 - a) * eps)) - u) ** 2).sum(-1)) for a in ab]
    want = 0.5 * eta * np.trapezoid(np.gradient(snr(ts), ts) * np.array(f), ts)
    np.testing.assert_allclose(float(aux["sdm"]), want, rtol=0.05)
    assert float(aux0["sdm"]) == 0
    ab1, ab0 = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))  # App. B: alpha_bar(1) = sigmoid(-gamma_0), alpha_bar(0) = sigmoid(-gamma_1)
    z, yy = q_samples(rng, y, ab1, m)
    np.testing.assert_allclose(float(aux["ce"]), np_cross_entropy(3.0 * z, yy), rtol=0.03)
    np.testing.assert_allclose(float(aux["kl"]), 0.5 * m * ((1 - ab0) + ab0 / m - 1 - np.log(1 - ab0)), rtol=1e-4)


def test_snr_prime_matches_finite_differences():
    p, t, h = noprop.init_gamma(KEY), jnp.linspace(0.05, 0.95, 19), 1e-3
    fd = (jnp.exp(-noprop.gamma(p, t + h)) - jnp.exp(-noprop.gamma(p, t - h))) / (2 * h)
    np.testing.assert_allclose(noprop.snr_prime(p, t), fd, rtol=2e-2)


def test_cross_entropy_takes_logits_not_probabilities():
    logits = 50.0 * jnp.eye(4)  # confidently right: CE ~ 0; a double softmax would give ~0.74
    assert float(noprop.cross_entropy(logits, jnp.arange(4))) < 1e-6


def test_ct_schedule_classifier_and_model_all_get_gradients():
    params, _ = noprop.init_ct(KEY, TINY, 4, "dim20")
    x, y = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4
    g = jax.jit(jax.grad(lambda p: noprop.loss_ct(p, {}, KEY, x, y)[0]))(params)
    for part in ("schedule", "model", "classifier", "W_embed"):
        assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g[part]))
        assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(g[part])) > 0, part


@pytest.mark.parametrize("steps", [10, 1000])
def test_ct_oracle_chain_ends_at_the_label(steps):
    u = jnp.array([1.0, 0.0, 0.0])
    sched = noprop.ct_grid_schedule(noprop.init_gamma(KEY), steps)
    z0 = noprop.sample_q(KEY, jnp.broadcast_to(u, (8_000, 3)), sched["alpha_bar"][0])  # z_0 ~ q(z_0|y)
    zT, path = noprop.eq3_chain(jax.random.fold_in(KEY, 1), z0, sched, lambda _, z: u, jnp.arange(steps))
    ab = sched["alpha_bar"]
    np.testing.assert_allclose(zT.mean(0), np.sqrt(ab[-1]) * u, atol=0.01)
    assert float(zT.var(0).max()) < 1.5 * (1 - float(ab[-1]))
    np.testing.assert_allclose(path[steps // 2].var(0), 1 - ab[steps // 2 + 1], rtol=0.05)


def test_ct_samplers_step_from_the_model_at_t_k_minus_1_as_written_out(monkeypatch):
    """ct_chain on the grid t_k = k/steps, u_hat(z_{k-1}, t_{k-1}) from a model that depends on t and z: "deterministic"
    is Eq. 3 without eps; "ode" is DDIM's step, z_k = sqrt(ab_k) u_hat + sqrt(1 - ab_k) eps_hat with
    eps_hat = (z_{k-1} - sqrt(ab_{k-1}) u_hat) / sqrt(1 - ab_{k-1})."""
    ct_constant_model(monkeypatch, lambda z, t: z + 4.0 * jnp.stack([t, 1 - t, 0 * t, 0 * t], -1))
    steps, m = 5, 4
    params, _ = noprop.init_ct(KEY, TINY, m)
    x = jnp.zeros((6,) + TINY)
    ab = np.asarray(noprop.alpha_bar_ct(params["schedule"], jnp.linspace(0.0, 1.0, steps + 1)), np.float64)
    sched = noprop.ct_grid_schedule(params["schedule"], steps)
    for sampler in ("deterministic", "ode"):
        zT, path = noprop.ct_chain(params, KEY, x, steps, sampler)
        z = np.asarray(path[0], np.float64)
        for k in range(1, steps + 1):
            t = (k - 1) / steps
            u = np_softmax(z + 4.0 * np.array([t, 1 - t, 0, 0]))
            if sampler == "ode":
                eps = (z - np.sqrt(ab[k - 1]) * u) / np.sqrt(1 - ab[k - 1])
                z = np.sqrt(ab[k]) * u + np.sqrt(1 - ab[k]) * eps
            else:
                z = float(sched["a"][k - 1]) * u + float(sched["b"][k - 1]) * z
            np.testing.assert_allclose(path[k], z, rtol=1e-4, atol=1e-5, err_msg=f"{sampler}, step {k}")


@pytest.mark.parametrize("steps", [4, 100])
def test_probability_flow_with_the_true_label_keeps_q_marginals(steps):
    """With u_hat = u_y and z_0 ~ q(z_0|y), the ODE's steps give z_k ~ q(z_k|y) at every k, with no noise added."""
    u = jnp.array([1.0, -1.0, 0.5])
    ab = jnp.sort(jax.random.uniform(KEY, (steps + 1,), minval=0.01, maxval=0.99))
    z0 = noprop.sample_q(KEY, jnp.broadcast_to(u, (100_000, 3)), ab[0])
    _, path = noprop.eq3_chain(KEY, z0, noprop.probability_flow_schedule(ab), lambda _, z: u, jnp.arange(steps), False)
    abk = np.asarray(ab[1:])[:, None]
    np.testing.assert_allclose(path.mean(1), np.sqrt(abk) * u, atol=0.015)
    np.testing.assert_allclose(path.var(1), np.broadcast_to(1 - abk, (steps, 3)), atol=0.015)


def test_ct_clipping_rescales_the_whole_gradient_so_weight_decay_keeps_its_share():
    # the schedule's gradient dominates the norm early on; clipping must not let the L2 term
    # swamp the model's share (Adam's first step is sign(g + wd p): clipping g + wd p keeps it)
    params, _ = noprop.init_ct(KEY, TINY, 4)
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    n = sum(leaf.size for leaf in jax.tree.leaves(params["schedule"]))
    grads["schedule"] = jax.tree.map(lambda p: 30 / n ** 0.5 * jnp.ones_like(p), params["schedule"])  # norm 30
    grads["model"]["img"]["fc"]["W"] = -grads["model"]["img"]["fc"]["W"]  # against the decay of positive weights
    up = {}
    for clip in (0.0, 1.0):
        opt = variants.adam_l2(1e-3, 1e-3, clip)
        up[clip], _ = jax.jit(opt.update)(grads, opt.init(params), params)  # one compile, not one per op
    for a, b in zip(jax.tree.leaves(up[0.0]["model"]), jax.tree.leaves(up[1.0]["model"])):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=1e-7)


def test_ct_fixed_schedule_never_moves_and_leaves_the_clip_to_the_model():
    # --schedule fixed: the schedule keeps its init, and its (large) gradient no longer shrinks the model's at the
    # clip. Two steps, as Adam's first is sign(g) whatever the clip: the second sees the first's scale.
    params, _ = noprop.init_ct(KEY, TINY, 4)
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    big = {**grads, "schedule": jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params["schedule"])}
    zero = {**grads, "schedule": jax.tree.map(jnp.zeros_like, params["schedule"])}

    def second_step(schedule, first):
        opt = variants.adam_l2(1e-3, 1e-3, 1.0, schedule)
        update = jax.jit(opt.update)
        up, state = update(first, opt.init(params), params)
        still = all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(up["schedule"]))
        assert still == (schedule == "fixed" or first is zero)  # the paper's schedule learns
        return update(zero, state, params)[0]["model"]

    same = [np.allclose(a, b, rtol=1e-6) for a, b in zip(jax.tree.leaves(second_step("fixed", big)),
                                                         jax.tree.leaves(second_step("learned", zero)))]
    assert all(same)
    moved = [np.allclose(a, b, rtol=1e-6) for a, b in zip(jax.tree.leaves(second_step("learned", big)),
                                                          jax.tree.leaves(second_step("learned", zero)))]
    assert not any(moved)  # learned: the schedule's gradient in the clip's norm changes the model's steps


def test_label_scale_scales_the_dense_label_path_alone():
    # --label-scale: the one-hot (or dim20) label path's init weights times s, every other parameter as before
    x, y = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4  # the prototypes' medoids
    for embedding, scaled in (("onehot", 1), ("dim20", 1), ("prototype", 0)):
        base, _ = noprop.init_ct(KEY, TINY, 4, embedding, x, y)
        big, _ = noprop.init_ct(KEY, TINY, 4, embedding, x, y, label_scale=10.0)
        flat_base, flat_big = jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(big)
        n_scaled = 0
        for (path, a), b in zip(flat_base, flat_big):
            lab_w = jax.tree_util.keystr(path) == "['model']['lab']['W']"
            np.testing.assert_allclose(b, 10.0 * a if lab_w and scaled else a, rtol=1e-6)
            n_scaled += lab_w and scaled
        assert n_scaled == scaled  # a prototype's label path is a conv stack: left alone


def test_ema_of_the_weights_follows_its_recursion_and_leaves_the_updates_alone():
    ema = loop.track_ema(0.9)
    p = {"w": jnp.array([1.0, -2.0])}
    state = ema.init(p)
    expect = np.asarray(p["w"])
    for n in range(30):
        u = {"w": jnp.array([0.5, 0.25]) * (n % 3 - 1)}
        out, state = ema.update(u, state, p)
        assert out is u  # the optimiser's updates pass through unchanged
        p = {"w": p["w"] + u["w"]}
        d = min(0.9, (1 + n) / (10 + n))  # warm-up: early steps weigh the new weights more
        expect = d * expect + (1 - d) * np.asarray(p["w"])
    np.testing.assert_allclose(state.ema["w"], expect, rtol=1e-6)


def test_ct_inference_computes_image_features_once():
    params, _ = noprop.init_ct(KEY, TINY, 4)
    jaxpr = jax.make_jaxpr(lambda x: noprop.predict_ct(params, {}, KEY, x, steps=5))(jnp.zeros((2,) + TINY))
    scan = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    dots = [e for e in scan.params["jaxpr"].jaxpr.eqns if e.primitive.name == "dot_general"]
    # label, its head1 share, head2, out, @ W_embed per image; the time path once per step (batch 1);
    # no conv, no image FC, no image share of head1
    assert len(dots) == 7 and sum(e.outvars[0].aval.shape[0] == 1 for e in dots) == 2


def test_continuous_logits_equal_head1_on_the_concatenated_paths():
    """continuous_features folds the image path into head1 (Fig. 6: FC on concat[img, label, time])."""
    p = noprop.init_continuous(KEY, TINY, 4, 4)
    x, z, t = jax.random.uniform(KEY, (3,) + TINY), jax.random.normal(KEY, (3, 4)), jnp.array([0.1, 0.5, 0.9])
    relu, dense = jax.nn.relu, noprop.dense
    h = jnp.concatenate([relu(noprop.conv_stack(p["img"], x)), relu(dense(p["lab"], z)),
                         relu(dense(p["time"], noprop.time_embedding(t)))], -1)
    want = dense(p["out"], relu(dense(p["head2"], relu(dense(p["head1"], h)))))
    feats = noprop.continuous_features(p, x)
    np.testing.assert_allclose(noprop.continuous_logits(p, feats, z, t, TINY), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(noprop.continuous_logits(p, feats, z, t[1:2], TINY),  # one t for the whole batch
                               noprop.continuous_logits(p, feats, z, jnp.full((3,), t[1]), TINY), rtol=1e-6, atol=1e-6)


# --- NoProp-FM ---

@pytest.mark.parametrize("steps", [1, 7, 1000])
def test_fm_euler_with_oracle_velocity_lands_on_the_label(steps):
    z0, u = jax.random.normal(KEY, (5, 3)), jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(noprop.euler_chain(z0, lambda t, z: u - z0, steps), jnp.broadcast_to(u, (5, 3)),
                               atol=1e-4)


def test_eq13_fm_path_runs_noise_to_label_and_regresses_u_y_minus_z0(monkeypatch):
    """Eqs. 10-11, 13 with v(z_t, t) = t z_t: z_t = t u_y + (1 - t) z_0 gives E|v - (u_y - z_0)|^2 =
    E(1 - t^2)^2 |u|^2 + E(1 + t - t^2)^2 d = 8/15 |u|^2 + 41/30 d (the reversed path: 41/30 |u|^2 + 28/15 d)."""
    ct_constant_model(monkeypatch, lambda z, t: t[:, None] * z)
    m, n = 4, 40_000
    params, _ = noprop.init_fm(KEY, TINY, m)
    x, y = jnp.zeros((n, 1, 1, 1)), jnp.arange(n) % m
    fm = float(jax.jit(lambda p: noprop.loss_fm(p, {}, KEY, x, y))(params)[0])
    np.testing.assert_allclose(fm, 8 / 15 + 41 / 30 * m, rtol=0.02)


def test_eq12_anchor_is_z_t_plus_one_minus_t_times_v(monkeypatch):
    """With a learnable W_embed, CE(p(y | z~_1)) at z~_1 = z_t + (1 - t) v (Eq. 12), against numpy Monte Carlo."""
    c = jnp.array([2.0, -1.0, 0.5, 0.0])
    ct_constant_model(monkeypatch, lambda z, t: jnp.broadcast_to(c, (z.shape[0], 4)))  # v = c @ W_embed
    n = 40_000
    params, _ = noprop.init_fm(KEY, TINY, 4, "dim20")
    W = np.asarray(params["W_embed"], np.float64)
    params["classifier"] = {"W": jnp.asarray(4.0 * W.T, jnp.float32), "b": jnp.zeros(4)}
    x, y = jnp.zeros((n, 1, 1, 1)), jnp.arange(n) % 4
    (_, (_, aux)) = jax.jit(lambda p: noprop.loss_fm(p, {}, KEY, x, y))(params)
    rng = np.random.default_rng(0)
    t, z0 = rng.uniform(size=(n, 1)), rng.standard_normal((n, 20))
    anchor = t * W[np.asarray(y)] + (1 - t) * z0 + (1 - t) * (np.asarray(c) @ W)
    np.testing.assert_allclose(float(aux["ce"]), np_cross_entropy(4.0 * anchor @ W.T, np.asarray(y)), rtol=0.03)


def test_fm_anchor_term_exactly_when_embedding_is_learnable():
    x, y = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4
    for embedding, anchored in (("onehot", False), ("dim20", True)):
        params, _ = noprop.init_fm(KEY, TINY, 4, embedding)
        (_, (_, aux)), g = jax.jit(jax.value_and_grad(
            lambda p: noprop.loss_fm(p, {}, KEY, x, y), has_aux=True))(params)
        assert ("ce" in aux) == anchored
        assert (float(jnp.abs(g["classifier"]["W"]).sum()) > 0) == anchored


def test_nearest_embedding_readout():
    W = jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    z = jnp.array([[2.0, 0.2], [0.1, -0.3], [0.4, 2.0]])
    np.testing.assert_array_equal(noprop.nearest_embedding(z, W), [1, 0, 2])
