"""Semantic tests for noprop: each names the equation or pitfall (peers.md P1-P14) it pins."""
import functools
import inspect
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import noprop
from harness import cli, data, loop

HERE = os.path.dirname(os.path.abspath(__file__))
# the real MNIST, when present; NOPROP_TEST_DATA=/nowhere runs the suite as a fresh clone would
DATA = os.environ.get("NOPROP_TEST_DATA", os.path.join(HERE, "..", "shared", "data"))
needs_mnist = pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "mnist.npz")),
                                 reason=f"{DATA}/mnist.npz not present")
KEY = jax.random.PRNGKey(0)
# the tiny training runs below compile the same programs again; share them through jax's disk cache
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "noprop-test-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# the tests check meaning on tiny programs, where XLA's compile time dwarfs the run time
jax.config.update("jax_disable_most_optimizations", True)
TINY = (16, 16, 1)  # smallest image the valid-conv stack accepts: 16 -> 14 -> 7 -> 5 -> 3 -> 1


def random_schedule(key, T):
    """An arbitrary increasing alpha_bar in (0, 1), to test the formulas beyond the cosine."""
    return noprop.schedule_from_alpha_bar(jnp.sort(jax.random.uniform(key, (T + 1,), minval=0.01, maxval=0.99)))


# --- Schedule and q (P1, P2, P6) ---

def test_p1_schedule_runs_noise_to_label_with_positive_weights():
    s = noprop.cosine_schedule(10)
    ab = np.asarray(s["alpha_bar"])
    assert np.all(np.diff(ab) > 0) and 0 < ab[0] < 0.01 and 0.99 < ab[-1] < 1
    assert np.all(np.diff(np.asarray(s["snr"])) > 0)  # every (T/2) eta dSNR(t) weight > 0
    assert np.all(np.asarray(s["a"]) > 0) and np.all(np.asarray(s["c"]) > 0)


def test_eq6_alpha_bar_is_product_from_t_to_T():
    s = noprop.cosine_schedule(10)
    prods = [np.prod(np.asarray(s["alpha"])[t:]) for t in range(11)]
    np.testing.assert_allclose(prods, s["alpha_bar"], rtol=1e-5)


def test_p2_q_samples_have_the_variance_preserving_moments():
    u = jnp.array([1.0, 0.0, -2.0, 0.5])
    for ab in (0.05, 0.5, 0.95):
        z = noprop.sample_q(KEY, jnp.broadcast_to(u, (200_000, 4)), ab)
        np.testing.assert_allclose(z.mean(0), np.sqrt(ab) * u, atol=0.01)
        np.testing.assert_allclose(z.var(0), 1 - ab, rtol=0.02)


@pytest.mark.parametrize("sched", [noprop.cosine_schedule(10), random_schedule(KEY, 7)])
def test_p6_a_b_c_are_the_gaussian_posterior(sched):
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
def test_p6_oracle_chain_reproduces_q_marginals_and_ends_at_label(sched):
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
    y_eval, s2 = noprop.batchnorm(p, s1, x, train=False)
    assert s2 is s1 and not np.allclose(y_eval, y)  # eval uses running statistics
    assert noprop.dropout(None, x) is x
    kept = noprop.dropout(KEY, jnp.ones(100_000))
    assert abs(float((kept == 0).mean()) - 0.2) < 0.01 and abs(float(kept.mean()) - 1) < 0.01


PAPER_COUNTS = {  # paper.md Sec. 4.4: (DT block, CT model) per dataset and embedding, exact recount
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
    ct = jax.eval_shape(lambda k: noprop.init_ct_model(k, shape, d, m), KEY)
    assert (noprop.count_params(dt), noprop.count_params(ct)) == PAPER_COUNTS[dataset, embedding]


def test_parameters_are_strongly_typed_float32_so_the_train_step_compiles_once():
    # a weak-typed leaf (jnp.array(python float)) comes back from the first step strongly typed,
    # and jit then compiles the whole training step a second and a third time
    for init in (functools.partial(noprop.init_dt, embedding="dim20", T=2), noprop.init_backprop, noprop.init_ct):
        params, _ = jax.eval_shape(lambda k: init(k, TINY, 4), KEY)  # types without computing anything
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            assert leaf.dtype == jnp.float32 and not leaf.weak_type, jax.tree_util.keystr(path)


def test_embeddings_orthogonal_and_medoid():
    W = noprop.init_embedding(KEY, "dim20", 10, (28, 28, 1))
    np.testing.assert_allclose(W @ W.T, np.eye(10), atol=1e-5)
    x = np.array([[0.0], [1.0], [1.1], [5.0], [3.0], [3.2], [9.0]]).reshape(7, 1, 1, 1)
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(noprop.medoid_images(x, y, 2)[:, 0], [1.0, 3.2])


# --- DT objective (P5, P9) ---

def tiny_dt(T=3, embedding="onehot"):
    params, state = noprop.init_dt(KEY, TINY, 4, embedding, T)
    x = jax.random.uniform(KEY, (8,) + TINY)
    return params, state, x, jnp.arange(8) % 4, noprop.cosine_schedule(T)


def test_p5_block_t_loss_has_zero_gradient_for_every_other_block():
    params, state, x, y, sched = tiny_dt(embedding="dim20")
    jac = jax.jit(jax.jacrev(lambda p: noprop.loss_dt(p, state, KEY, x, y, sched)[1][1]["L_t"]))(params)
    for t in range(3):  # jac leaves: (L_t index, block index, ...)
        for s in range(3):
            norm = sum(float(jnp.abs(leaf[t, s]).sum()) for leaf in jax.tree.leaves(jac["blocks"]))
            assert (norm > 0) == (s == t), (t, s, norm)
        for shared in ("classifier", "W_embed"):  # shared parts: trained by every L_t
            assert sum(float(jnp.abs(leaf[t]).sum()) for leaf in jax.tree.leaves(jac[shared])) > 0


def test_p9_eq8_weight_is_T_over_2_eta_dsnr_times_squared_error_summed_over_dims():
    params, state, x, y, sched = tiny_dt()
    c = jnp.array([0.5, -1.0, 2.0, 0.0])  # make every block output the same logits c
    params["blocks"]["out"] = {"W": jnp.zeros_like(params["blocks"]["out"]["W"]),
                               "b": jnp.broadcast_to(c, (3, 4))}
    loss = jax.jit(lambda p, eta: noprop.loss_dt(p, state, KEY, x, y, sched, eta)[0])
    l_eta, l_0 = loss(params, 0.3), loss(params, 0.0)
    sq = np.mean(np.sum((np.asarray(jax.nn.softmax(c)) - np.eye(4)[np.asarray(y)]) ** 2, -1))
    expected = sum(3 / 2 * 0.3 * float(sched["snr"][t] - sched["snr"][t - 1]) * sq for t in (1, 2, 3))
    np.testing.assert_allclose(l_eta - l_0, expected, rtol=1e-4)


def test_backprop_baseline_sends_gradient_through_every_block_and_it_is_the_loss_gradient():
    params, state = noprop.init_backprop(KEY, TINY, 4, T=3)
    x, y = jax.random.uniform(KEY, (16,) + TINY), jnp.arange(16) % 4
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p: noprop.loss_backprop(p, state, KEY, x, y)[0]))
    loss, g = loss_and_grad(params)
    for s in range(3):  # unlike NoProp (P5): the one loss reaches every block and every w_t
        assert sum(float(jnp.abs(leaf[s]).sum()) for leaf in jax.tree.leaves(g["blocks"])) > 0
    assert bool(jnp.all(g["w"] != 0))
    # a small step along -g lowers the end-to-end loss by |g| * step to first order (same dropout
    # mask and batch): the gradient is that of the whole chain, so ordinary backprop trains it
    norm = float(jnp.sqrt(sum((leaf ** 2).sum() for leaf in jax.tree.leaves(g))))
    step = 1e-2
    moved = jax.tree.map(lambda p, d: p - step / norm * d, params, g)
    np.testing.assert_allclose(float(loss - loss_and_grad(moved)[0]), step * norm, rtol=0.2)


@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_unrolled_block_axis_computes_what_vmap_and_scan_compute(method):
    """map_blocks / scan_blocks: the unrolled loop is the same map as vmap and the same chain as lax.scan."""
    if method == "dt":
        params, state, x, y, sched = tiny_dt(embedding="dim20")
        loss = functools.partial(noprop.loss_dt, sched=sched)
        predict = functools.partial(noprop.predict_dt, sched=sched)
    else:
        params, state = noprop.init_backprop(KEY, TINY, 4, "dim20", T=3)
        x, y = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4
        loss, predict = noprop.loss_backprop, noprop.predict_backprop
    outs = {}
    for form in ("vmap", "unroll"):
        grad = jax.value_and_grad(lambda p: loss(p, state, KEY, x, y, block_axis=form), has_aux=True)
        (value, (new_state, aux)), g = jax.jit(grad)(params)
        outs[form] = (value, new_state, aux, g, jax.jit(functools.partial(predict, block_axis=form))(params, state, KEY, x))
    (v1, s1, a1, g1, p1), (v2, s2, a2, g2, p2) = outs["vmap"], outs["unroll"]
    assert float(v1) > 0 and sum(float(jnp.abs(leaf).sum()) for leaf in jax.tree.leaves(g1["blocks"])) > 0
    # float tolerance, on the scale of all the gradients (biases before batch norm have gradient 0 in exact
    # math and float noise here) and of each other array
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves((v1, s1, a1)), jax.tree.leaves((v2, s2, a2))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_array_equal(p1, p2)
    with pytest.raises(ValueError, match="block_axis"):
        noprop.unrolled("scan")


def adjoint_problem(steps, adjoint):
    """CE after the adjoint baseline's ODE on a tiny problem, by the adjoint method or by backprop through Euler."""
    params, _ = noprop.init_adjoint(KEY, TINY, 4, "dim20")
    x, y = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4

    def loss(p):
        W = noprop.class_embeddings(p)
        args = {"model": p["model"], "feats": noprop.ct_features(p["model"], x), "W": W}
        z0 = jax.random.normal(KEY, (8, W.shape[1]))
        if adjoint:
            z1 = noprop.odeint_adjoint(noprop.adjoint_field, z0, args, steps)
        else:
            z1 = noprop.euler_chain(z0, lambda t, z: noprop.adjoint_field(z, t, args), steps)
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


# --- Evaluation sees only images (P4) ---

def test_p4_prediction_functions_take_no_labels():
    for fn in (noprop.predict_dt, noprop.predict_ct, noprop.predict_fm, noprop.predict_backprop, noprop.predict_adjoint):
        assert not {"y", "labels", "y_test"} & set(inspect.signature(fn).parameters)


# --- End to end on real MNIST (P3, P4, P14): learns, and the ablations hurt ---

@pytest.fixture
def optimized():
    """These runs spend their time running, not compiling: let XLA optimise them."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


# T=2, lr 2e-3 and batch 16 keep this short: the classifier p(y|z_T) needs ~250 such steps
# (DT: 86-91 % over three seeds; a batch-16 step costs 46 % of a batch-32 one on this CPU)
SLICE = ["--data-dir", DATA, "--T", "2", "--batch-size", "16", "--epochs", "2", "--lr", "2e-3",
         "--train-limit", "2048", "--test-limit", "500", "--eval-runs", "2", "--quiet"]


@pytest.fixture(scope="module")
def dt_slice(tmp_path_factory):
    import train_dt
    jax.config.update("jax_disable_most_optimizations", False)
    out = tmp_path_factory.mktemp("dt") / "dt.json"
    try:
        record, tree = train_dt.main(SLICE + ["--out", str(out)])
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
    return record, tree, out


@needs_mnist
def test_dt_learns_mnist_slice_and_ablations_hurt(dt_slice, optimized):
    record, tree, out = dt_slice
    assert out.exists() and record["test_acc_mean"] > 0.7, record  # chance is 0.1
    _, _, x_te, y_te = data.load_dataset("mnist", DATA, offline=True)
    x_te, y_te = x_te[:500], y_te[:500]
    params, state, sched = tree["params"], tree["state"], noprop.cosine_schedule(2)

    predict = jax.jit(noprop.predict_dt)  # one compile for all four calls: same shapes, same tree

    def acc(W, s, labels=y_te):  # W: the one-hot embedding (fixed, so not in params), or an ablation
        return float(jnp.mean(predict({**params, "W_embed": W}, state, KEY, x_te, s) == labels))

    assert acc(jnp.eye(10), sched) > 0.7
    assert acc(jnp.eye(10), sched, np.random.default_rng(0).permutation(y_te)) < 0.2  # shuffled labels
    assert acc(jnp.zeros((10, 10)), sched) < 0.3  # P3: zero embedding
    assert acc(jnp.eye(10), {**sched, "a": jnp.zeros(2)}) < 0.3  # P3: chain without the model


@needs_mnist
def test_backprop_baseline_learns_every_class_and_matches_dt_on_the_same_slice(dt_slice, optimized):
    import train_dt
    record, _ = train_dt.main(SLICE + ["--method", "backprop"])
    # with a random classifier init, 4 of 10 digits ended at ~0 % recall here (seed 0: 49.8 %);
    # with 5 pinv(W_embed) every class is learned (89.6 % and 91.4 % over seeds 0-1, min recall 0.70)
    assert min(record["test_class_recall"]) > 0.3, record["test_class_recall"]
    assert record["test_acc_mean"] > dt_slice[0]["test_acc_mean"] - 0.08, (record["test_acc_mean"], dt_slice[0]["test_acc_mean"])


@needs_mnist
def test_ct_learns_mnist_slice_without_collapse_at_few_steps_and_zero_embedding_hurts(optimized):
    import train_ct
    record, tree = train_ct.main(["--data-dir", DATA, "--batch-size", "32", "--epochs", "8", "--lr", "2e-3",
                                  "--train-limit", "2048", "--test-limit", "500", "--steps", "20",
                                  "--eval-runs", "1", "--quiet"])
    _, _, x_te, y_te = data.load_dataset("mnist", DATA, offline=True)
    x_te, y_te, params = x_te[:500], y_te[:500], tree["params"]

    predict = jax.jit(noprop.predict_ct, static_argnums=4)

    def acc(W, steps):  # W: the one-hot embedding (fixed, so not in params), or an ablation
        return float(jnp.mean(predict({**params, "W_embed": W}, {}, KEY, x_te, steps) == y_te))

    # 512 steps: with clipping and the weight average (the defaults) 92.0 / 91.8 / 91.2 % over seeds 0-2, rising
    # every epoch; clipped, raw weights: 88.8 / 91.2 / 90.6 % over seeds 0-2, with falls of up to 6 points;
    # neither: 59.0 / 68.8 / 49.8 %, falls of up to 17 points between epochs. Chance is 10 %.
    history = [h["test_acc"] for h in record["history"]]
    assert all(b > a - 0.01 for a, b in zip(history, history[1:])), history  # steady: no fall over a point
    assert record["test_acc_mean"] > 0.75 and acc(jnp.eye(10), 5) > 0.5, record  # P7: no collapse at 5 steps
    assert acc(jnp.zeros((10, 10)), 5) < 0.16  # P3 (at 5 steps too: one compile serves both)


@needs_mnist
def test_fm_dim20_learns_mnist_slice_and_embedding_does_not_collapse(optimized):
    import train_fm
    record, tree = train_fm.main(["--data-dir", DATA, "--embedding", "dim20", "--batch-size", "32",
                                  "--epochs", "6", "--lr", "2e-3", "--train-limit", "2048",
                                  "--test-limit", "500", "--steps", "20", "--eval-runs", "1", "--quiet"])
    W = np.asarray(tree["params"]["W_embed"])
    dists = np.linalg.norm(W[:, None] - W[None], axis=-1)[~np.eye(10, dtype=bool)]
    assert record["test_acc_mean"] > 0.4, record  # chance 0.1 (64-78 % here after 384 steps, two compile modes)
    norms = np.linalg.norm(W, axis=1)  # init: unit rows at distance sqrt(2); training shrinks them all
    # together (to ~0.5 after 384 steps here), so separation is judged relative to their size (~0.9-1.0 here)
    assert norms.min() > 0.25 and dists.min() > 0.5 * norms.mean(), (norms, dists.min())


# --- NoProp-CT: learned schedule (P8), Eq. 9 (P10), inference (P7) ---

def test_p8_learned_schedule_is_monotone_for_any_parameters():
    t = jnp.linspace(0.0, 1.0, 201)
    p0 = noprop.init_gamma(KEY)
    ab = noprop.alpha_bar_ct(p0, t)
    assert float(ab[0]) < 0.02 and float(ab[-1]) > 0.98  # endpoints after init
    for i in range(20):  # arbitrary, large parameter values: still increasing alpha_bar and SNR
        k = jax.random.fold_in(KEY, i)
        p = jax.tree.map(lambda a, kk: 5 * jax.random.normal(kk, a.shape), p0,
                         dict(zip(p0, jax.random.split(k, len(p0)))))
        assert bool(jnp.all(noprop.snr_prime(p, t) > 0)) and bool(jnp.all(jnp.diff(noprop.alpha_bar_ct(p, t)) >= 0))


def test_snr_prime_matches_finite_differences():
    p, t, h = noprop.init_gamma(KEY), jnp.linspace(0.05, 0.95, 19), 1e-3
    fd = (jnp.exp(-noprop.gamma(p, t + h)) - jnp.exp(-noprop.gamma(p, t - h))) / (2 * h)
    np.testing.assert_allclose(noprop.snr_prime(p, t), fd, rtol=2e-2)


def test_p10_cross_entropy_takes_logits_not_probabilities():
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
    z0 = jax.random.normal(KEY, (20_000, 3))
    zT, path = noprop.eq3_chain(jax.random.fold_in(KEY, 1), z0, sched, lambda _, z: u, jnp.arange(steps))
    ab = sched["alpha_bar"]
    np.testing.assert_allclose(zT.mean(0), np.sqrt(ab[-1]) * u, atol=0.01)
    assert float(zT.var(0).max()) < 1.5 * (1 - float(ab[-1]))
    np.testing.assert_allclose(path[steps // 2].var(0), 1 - ab[steps // 2 + 1], rtol=0.05)


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
        opt = noprop.adam_l2(1e-3, 1e-3, params, clip)
        up[clip], _ = opt.update(grads, opt.init(params), params)
    for a, b in zip(jax.tree.leaves(up[0.0]["model"]), jax.tree.leaves(up[1.0]["model"])):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=1e-7)


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


def test_ct_logits_equal_head1_on_the_concatenated_paths():
    """ct_features folds the image path into head1 (Fig. 6: FC on concat[img, label, time])."""
    p = noprop.init_ct_model(KEY, TINY, 4, 4)
    x, z, t = jax.random.uniform(KEY, (3,) + TINY), jax.random.normal(KEY, (3, 4)), jnp.array([0.1, 0.5, 0.9])
    relu, dense = jax.nn.relu, noprop.dense
    h = jnp.concatenate([relu(noprop.conv_stack(p["img"], x)), relu(dense(p["lab"], z)),
                         relu(dense(p["time"], noprop.time_embedding(t)))], -1)
    want = dense(p["out"], relu(dense(p["head2"], relu(dense(p["head1"], h)))))
    feats = noprop.ct_features(p, x)
    np.testing.assert_allclose(noprop.ct_logits(p, feats, z, t), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(noprop.ct_logits(p, feats, z, t[1:2]),  # one t for the whole batch
                               noprop.ct_logits(p, feats, z, jnp.full((3,), t[1])), rtol=1e-6, atol=1e-6)


# --- NoProp-FM ---

@pytest.mark.parametrize("steps", [1, 7, 1000])
def test_fm_euler_with_oracle_velocity_lands_on_the_label(steps):
    z0, u = jax.random.normal(KEY, (5, 3)), jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(noprop.euler_chain(z0, lambda t, z: u - z0, steps), jnp.broadcast_to(u, (5, 3)),
                               atol=1e-4)


def test_fm_anchor_term_exactly_when_embedding_is_learnable():
    x, y = jax.random.uniform(KEY, (8,) + TINY), jnp.arange(8) % 4
    for embedding, anchored in (("onehot", False), ("dim20", True)):
        params, _ = noprop.init_ct(KEY, TINY, 4, embedding)
        (_, (_, aux)), g = jax.jit(jax.value_and_grad(
            lambda p: noprop.loss_fm(p, {}, KEY, x, y), has_aux=True))(params)
        assert ("ce" in aux) == anchored
        assert (float(jnp.abs(g["classifier"]["W"]).sum()) > 0) == anchored


def test_nearest_embedding_readout():
    W = jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    z = jnp.array([[2.0, 0.2], [0.1, -0.3], [0.4, 2.0]])
    np.testing.assert_array_equal(noprop.nearest_embedding(z, W), [1, 0, 2])


# --- Data loading and command-line errors ---

def write_npz(path, **over):
    arrays = dict(x_train=np.zeros((4, 28, 28, 1), np.uint8), y_train=np.arange(4, dtype=np.uint8),
                  x_test=np.zeros((2, 28, 28, 1), np.uint8), y_test=np.arange(2, dtype=np.uint8))
    arrays.update(over)
    np.savez(path, **arrays)


@pytest.mark.parametrize("over,message", [
    (dict(y_train=np.array([0, 1, 2, 10], np.uint8)), "labels span 0..10"),
    (dict(x_train=np.zeros((4, 28, 28, 3), np.uint8)), "expected uint8(N, 28, 28, 1)"),
    (dict(x_test=np.zeros((2, 28, 28, 1), np.float64)), "images are float64"),
    (dict(y_test=np.arange(3)), "expected integer (2,)")])
def test_bad_dataset_files_are_refused(tmp_path, over, message):
    write_npz(tmp_path / "mnist.npz", **over)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_dataset("mnist", str(tmp_path))


def test_good_npz_loads_and_corrupt_or_unknown_is_refused(tmp_path):
    write_npz(tmp_path / "mnist.npz")
    x, y, _, _ = data.load_dataset("mnist", str(tmp_path))
    assert x.dtype == np.float32 and x.shape == (4, 28, 28, 1) and list(y) == [0, 1, 2, 3]
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load_dataset("mnist", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load_dataset("imagenet", str(tmp_path))


def test_tfds_branch_offline_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        x, y, x_te, y_te = data.load_dataset("mnist", str(tmp_path), offline=True, use_tfds=True)
    assert x.shape == (6, 28, 28, 1) and 0 <= x.min() and x.max() <= 1 and y.max() < 10


# --- Download on first use, from a mirror on 127.0.0.1 (these machines are offline) ---

def canonical_files(name, rng):
    """Small files in each dataset's canonical format, and the arrays they hold."""
    import gzip, io, tarfile
    n = {"train": 5, "test": 3}
    shape, m = data.DATASETS[name]
    arrays = {f"{a}_{s}": (rng.integers(0, 256, (n[s],) + shape) if a == "x" else rng.integers(0, m, n[s])).astype(np.uint8)
              for s in n for a in "xy"}
    if name == "mnist":  # Keras's mnist.npz: (N, 28, 28) images
        buf = io.BytesIO()
        np.savez(buf, **{k: v[..., 0] if k[0] == "x" else v for k, v in arrays.items()})
        return {"mnist.npz": buf.getvalue()}, arrays
    if name == "fashion_mnist":  # idx: magic (0, 0, 8, rank), big-endian dims, bytes
        def idx(a):
            return gzip.compress(bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.tobytes())
        return {f"{p}-{kind}-idx{r}-ubyte.gz": idx(arrays[f"{a}_{s}"][..., 0] if a == "x" else arrays[f"{a}_{s}"])
                for s, p in (("train", "train"), ("test", "t10k")) for a, kind, r in (("x", "images", 3), ("y", "labels", 1))}, arrays
    fine = name == "cifar100"  # binary records: [coarse label,] label, 3072 bytes channel-first

    def records(s, sl=slice(None)):
        x, y = arrays[f"x_{s}"][sl], arrays[f"y_{s}"][sl]
        labels = np.stack([y // 5, y], 1) if fine else y[:, None]
        return np.concatenate([labels, x.transpose(0, 3, 1, 2).reshape(len(x), -1)], 1).astype(np.uint8).tobytes()

    members = {"train.bin": records("train"), "test.bin": records("test")} if fine else \
        {**{f"data_batch_{i + 1}.bin": records("train", slice(i, i + 1)) for i in range(5)}, "test_batch.bin": records("test")}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, blob in members.items():
            info = tarfile.TarInfo(f"cifar-binary/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return {next(iter(data.SOURCES[name][1])): buf.getvalue()}, arrays


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A threaded HTTP server on 127.0.0.1 (a free port) serving tmp_path/www; NOPROP_DATA_URL points at it."""
    import functools as ft, http.server, threading
    www = tmp_path / "www"
    www.mkdir()
    handler = ft.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NOPROP_DATA_URL", f"http://127.0.0.1:{server.server_address[1]}/")

    def serve(name, corrupt=False):
        files, arrays = canonical_files(name, np.random.default_rng(0))
        for f, blob in files.items():
            (www / f).write_bytes(blob)  # the test's small files stand in for the canonical ones
        monkeypatch.setitem(data.SOURCES, name, (data.SOURCES[name][0], {
            f: (len(b), "0" * 64 if corrupt else __import__("hashlib").sha256(b).hexdigest()) for f, b in files.items()}))
        return arrays

    yield serve
    server.shutdown()


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_download_verifies_converts_and_loads_every_dataset(tmp_path, mirror, name):
    arrays = mirror(name)
    x, y, x_te, y_te = data.load_dataset(name, str(tmp_path / "cache"))
    np.testing.assert_array_equal(x, arrays["x_train"] / np.float32(255))
    np.testing.assert_array_equal(y, arrays["y_train"]), np.testing.assert_array_equal(y_te, arrays["y_test"])
    np.testing.assert_array_equal(x_te, arrays["x_test"] / np.float32(255))
    assert sorted(os.listdir(tmp_path / "cache")) == [f"{name}.npz"]  # nothing else left behind


def test_wrong_checksum_is_one_line_and_leaves_no_file(tmp_path, mirror):
    mirror("fashion_mnist", corrupt=True)
    with pytest.raises(ValueError, match="SHA-256 [0-9a-f]{64} is not the expected 0{64}; file discarded") as e:
        data.load_dataset("fashion_mnist", str(tmp_path / "cache"))
    assert "\n" not in str(e.value) and os.listdir(tmp_path / "cache") == []


def test_refused_connection_fails_in_seconds_and_offline_never_connects(tmp_path, monkeypatch):
    import socket, time
    with socket.socket() as s:  # bound, never listening: connections are refused, and no other process can take the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setenv("NOPROP_DATA_URL", f"http://127.0.0.1:{port}")
        t0 = time.time()
        with pytest.raises(ValueError, match=f"could not download http://127.0.0.1:{port}/mnist.npz"):
            data.load_dataset("mnist", str(tmp_path))
        assert time.time() - t0 < 5
    with pytest.raises(ValueError, match="no cifar10.npz in .* and --offline forbids downloading it"):
        data.load_dataset("cifar10", str(tmp_path), offline=True)
    assert not any(p.name.endswith(".npz") for p in tmp_path.iterdir())


def test_first_run_downloads_then_trains(tmp_path, mirror, capsys):
    mirror("mnist")  # 5 training images: one batch of 4
    import train_dt
    record, _ = train_dt.main(["--data-dir", str(tmp_path / "cache"), "--T", "1", "--batch-size", "4",
                               "--epochs", "1", "--eval-runs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert "downloading http://127.0.0.1" in err and "mnist.npz" in err and len(record["history"]) == 1
    assert (tmp_path / "cache" / "mnist.npz").exists()


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--method", "adjoint"], "invalid choice: 'adjoint'"),
    (["--data-dir", "/nonexistent", "--dataset", "cifar100", "--offline"], "error: no cifar100.npz in /nonexistent"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--method", "sgd"], "invalid choice: 'sgd'"),
    (["--train-limit", "3"], "fewer than one batch"),
    (["--num-processes", "2"], "--num-processes 2 needs --coordinator HOST:PORT"),
    (["--num-processes", "2", "--coordinator", "localhost:1234", "--process-id", "2"], "--process-id must be below")])
def test_bad_flags_exit_with_one_line_errors(argv, message, capsys, tmp_path):
    import train_dt  # SystemExit, not an exception from inside JAX: Python prints no traceback for it
    write_npz(tmp_path / "mnist.npz")
    with pytest.raises(SystemExit) as e:
        train_dt.main(["--data-dir", str(tmp_path)] + argv)
    # argparse prints usage then one error line (exit 2); our checks exit with the message itself
    last = (capsys.readouterr().err.strip() or str(e.value.code)).splitlines()[-1]
    assert e.value.code not in (0, None) and message in last, last


def test_help_gives_every_flag_a_meaning_and_its_default(capsys):
    import train_ct, train_dt, train_fm
    for script in (train_dt, train_ct, train_fm):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside words
        for k, v in script.DEFAULTS.items():
            assert f"--{k.replace('_', '-')}" in out and "".join(cli.HELP[k].split()) in out, k
        assert "(default:128)" in out and "(default:0.001)" in out


def test_cli_error_from_the_real_script_has_no_traceback(background):
    r = background("cli")
    assert r.returncode != 0 and "invalid choice: 'imagenet'" in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- Checkpoints, resume and the NaN guard (one code path: harness.loop.fit) ---

def tiny_run(tmp_path, *extra):
    rng = np.random.default_rng(0)
    if not (tmp_path / "mnist.npz").exists():
        write_npz(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (96, 28, 28, 1), dtype=np.uint8),
                  y_train=rng.integers(0, 10, 96).astype(np.uint8), y_test=np.arange(2, dtype=np.uint8))
    import train_dt
    return train_dt.main(["--data-dir", str(tmp_path), "--T", "1", "--batch-size", "32",
                          "--eval-runs", "1", "--quiet"] + list(extra))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    ck = str(tmp_path / "ck")
    _, full = tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(tmp_path / "ck_full"))  # checkpoints on every epoch
    tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", ck)
    record, resumed = tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", ck, "--resume")
    assert len(record["history"]) == 2 and len(record["history"][0]["terms"]["L_t"]) == 1  # per-term means
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_incompatible_or_damaged_checkpoints_are_refused(tmp_path):
    ck = tmp_path / "ck"
    tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", str(ck))
    with pytest.raises(SystemExit, match="checkpoint has embedding='onehot', this run has 'dim20'"):
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume", "--embedding", "dim20")
    data = (ck / "checkpoint.npz").read_bytes()
    (ck / "checkpoint.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume")


def test_nan_guard_names_epoch_step_and_term_and_keeps_last_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(SystemExit, match=r"non-finite loss at epoch \d+, step \d+ \(bad: .+\); last good"):
        tiny_run(tmp_path, "--epochs", "20", "--lr", "1e9", "--checkpoint-dir", str(ck))


# --- Subprocess checks: started together with the session, they compile on the second core ---

FAST_COMPILE = "--xla_backend_optimization_level=0"  # for subprocess tests of meaning, not speed


def subprocess_checks(tmp):
    """name -> (argv, extra environment) of each check that needs a fresh Python; test_<name>_... waits for it."""
    two_devices = FAST_COMPILE + " --xla_force_host_platform_device_count=2"
    return {"cli": ([os.path.join(HERE, "train_dt.py"), "--dataset", "imagenet"], {}),
            "sharding": (["-c", SHARDED_STEP], {"XLA_FLAGS": two_devices}),
            "bench": (["-m", "bench.speed", "--tiny", "--out", os.path.join(tmp, "bench.json")],
                      {"XLA_FLAGS": FAST_COMPILE}),  # checks the script, not its speed
            "memory": (["-m", "bench.speed", "--tiny", "--memory", "--out", os.path.join(tmp, "memory.json")],
                       {"XLA_FLAGS": FAST_COMPILE}),
            "profile": (["-m", "bench.speed", "--tiny", "--profile", "--out", os.path.join(tmp, "profile.json")], {}),
            "processes": (["-c", PROCESSES, tmp], {"XLA_FLAGS": FAST_COMPILE})}


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """Start the selected subprocess checks at once; a test calls background(name) to wait for its result.

    XLA compiles on one thread, so these fresh processes use the second core while the
    in-process tests run: the suite takes about half as long as running them in turn.
    """
    tmp = str(tmp_path_factory.mktemp("subprocess"))
    wanted = {item.name.split("_")[1] for item in request.session.items}  # test_<name>_...
    procs = {}
    for name, (argv, env) in subprocess_checks(tmp).items():
        if name in wanted:
            logs = [open(os.path.join(tmp, f"{name}.{s}"), "w+") for s in ("out", "err")]
            procs[name] = (subprocess.Popen([sys.executable] + argv, stdout=logs[0], stderr=logs[1], cwd=HERE, text=True,
                                            env={**os.environ, "JAX_PLATFORMS": "cpu", **env}), logs)

    def result(name):
        proc, logs = procs[name]
        proc.wait(timeout=600)
        out, err = (f.seek(0) or f.read() for f in logs)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    yield result
    for proc, logs in procs.values():
        proc.kill()
        for f in logs:
            f.close()


# --- Many devices (jax.sharding): one sharded step equals the single-device step ---

PROCESSES = """
import json, os, random, socket, subprocess, sys
import numpy as np
tmp = sys.argv[1]
rng = np.random.default_rng(0)
np.savez(os.path.join(tmp, "mnist.npz"), x_train=rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
         y_train=rng.integers(0, 10, 64).astype(np.uint8), x_test=rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
         y_test=rng.integers(0, 10, 16).astype(np.uint8))

def free_port(mpirun):
    # under mpirun, jax takes the coordinator's port from the job id: 61440 + (id // 4096) % 4096. Pick a free
    # one at random in that range, since a fixed job id would collide with another suite running on this machine
    for port in random.sample(range(61440, 65536), 4096) if mpirun else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                pass

def start(script, tag, n, *extra, ranks=None, mpirun=False, join=120):
    # join: seconds a process waits for the others (NOPROP_JOIN_TIMEOUT); generous, since a dozen
    # processes start JAX at once on the test machine's cores, but short where a process never comes
    argv = [sys.executable, script, "--data-dir", tmp, "--batch-size", "16", "--eval-runs", "1", "--quiet", *extra]
    port = free_port(mpirun)
    many = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)] if n > 1 else []
    # mpirun's environment instead of the flags: jax.distributed finds the coordinator and ranks there
    ompi = lambda i: {"OMPI_MCA_orte_hnp_uri": f"{(port - 61440) * 4096}.0;tcp://127.0.0.1:{port}", "OMPI_COMM_WORLD_SIZE": str(n),
                      "OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_LOCAL_RANK": str(i)}
    return [subprocess.Popen(argv + ([] if mpirun else many(i)) + ["--out", os.path.join(tmp, f"{tag}.json")], text=True,
                             env={**os.environ, "NOPROP_JOIN_TIMEOUT": str(join), **(ompi(i) if mpirun else {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in ranks or range(n)]

def finish(procs):
    return [(p.wait(300), *p.communicate()) for p in procs]

dt, ct = ["train_dt.py", "--T", "2", "--block-axis", "vmap"], ["train_ct.py", "--steps", "10"]  # 2 processes: vmap, so 1 too
ck = ["--checkpoint-dir", os.path.join(tmp, "ck")]
groups = {"dt_1": start(*dt[:1], "dt_1", 1, *dt[1:], "--epochs", "2"),
          "ct_1": start(*ct[:1], "ct_1", 1, *ct[1:], "--epochs", "2"),
          "ct_2": start(*ct[:1], "ct_2", 2, *ct[1:], "--epochs", "2"),
          "dt_2a": start(*dt[:1], "dt_2", 2, *dt[1:], "--epochs", "1", *ck),
          "mpirun": start(*dt[:1], "mpirun", 2, *dt[1:], "--epochs", "1", mpirun=True)}
out = {k: finish(v) for k, v in groups.items()}
out["dt_2"] = finish(start(*dt[:1], "dt_2", 2, *dt[1:], "--epochs", "2", *ck, "--resume"))  # resumed on both
out["alone"] = finish(start(*dt[:1], "alone", 2, *dt[1:], "--epochs", "1", ranks=[0], join=5))  # process 1 never comes
print(json.dumps(out))
"""


def test_processes_train_as_one_program_equal_to_a_single_process(background):
    """jax.distributed on 127.0.0.1: 2 processes of train_dt.py (blocks split between them, resumed
    half way; also started as mpirun would) and of train_ct.py (data parallel) give one process's
    losses; each holds its own blocks."""
    r = background("processes")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for group in ("dt_1", "ct_1", "ct_2", "dt_2a", "dt_2", "mpirun"):
        assert all(code == 0 for code, _, _ in out[group]), (group, [e[-2000:] for _, _, e in out[group]])
    tmp = r.args[-1]
    for v in ("dt", "ct"):
        one, two = (json.load(open(os.path.join(tmp, f"{v}_{n}.json"))) for n in (1, 2))
        assert two["processes"] == 2 and one["processes"] == 1 and len(two["history"]) == 2
        # not tighter: Adam scales the float-order noise in the ~0 gradients of the biases before batch norm to lr-sized steps
        np.testing.assert_allclose([h["loss"] for h in two["history"]], [h["loss"] for h in one["history"]], rtol=2e-4)
    mpirun, dt_1 = (json.load(open(os.path.join(tmp, f"{n}.json"))) for n in ("mpirun", "dt_1"))  # found by environment
    assert mpirun["processes"] == 2 and mpirun["history"][0]["loss"] == pytest.approx(dt_1["history"][0]["loss"], rel=2e-4)
    holds = [[l for l in e.splitlines() if l.startswith("process ")] for _, _, e in out["dt_2"]]
    assert holds == [["process 0 of 2, 1 device(s): blocks 1 of 2"], ["process 1 of 2, 1 device(s): blocks 2 of 2"]]
    assert out["dt_2"][1][1] == ""  # only process 0 prints
    (code, _, err), = out["alone"]
    assert code == 1 and err.strip().splitlines()[-1] == ("error: process 0 of 2: the processes did not all join at "
                                                          f"{err.split(' at ')[1].split()[0]} within 5 s")

SHARDED_STEP = """
import functools, jax, jax.numpy as jnp, numpy as np, noprop
from harness import loop
assert jax.device_count() == 2
key, shape = jax.random.PRNGKey(0), (16, 16, 1)
x, y = jax.random.uniform(key, (8,) + shape), jnp.arange(8) % 10
for variant in ("dt", "ct"):
    if variant == "dt":
        params, state = noprop.init_dt(key, shape, 10, "onehot", T=2)
        loss = functools.partial(noprop.loss_dt, sched=noprop.cosine_schedule(2))
    else:
        (params, state), loss = noprop.init_ct(key, shape, 10, "dim20"), noprop.loss_ct
    # the step's math is loss, new BN state and gradients (the optimiser update is elementwise)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ref = grad(params, state, key, x, y)
    placed, batch = loop.place({"params": params, "state": state}, variant, 2)
    out = grad(placed["params"], placed["state"], key, *jax.device_put((x, y), batch))
    split = out[1]["blocks"]["out"]["W"] if variant == "dt" else placed["params"]["model"]["out"]["W"]
    assert len(split.sharding.device_set) == 2
    if variant == "dt":  # each device holds (and trains) one of the two blocks
        assert [s.data.shape[0] for s in split.addressable_shards] == [1, 1]
    # float tolerance (summation order differs across devices), on the scale of all gradients:
    # biases that feed batch norm have gradient 0 in exact math and +-1e-6 of noise here
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref[1]))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4 * scale)
print("sharded == single-device")
"""


def test_sharding_step_equals_single_device_step_dt_blocks_and_ct_batch(background):
    r = background("sharding")
    assert r.returncode == 0 and "sharded == single-device" in r.stdout, r.stderr[-3000:]


def test_devices_flag_must_divide_the_split_axis(tmp_path):
    with pytest.raises(SystemExit, match="--devices 3 must divide T = 1|only 1 device"):
        tiny_run(tmp_path, "--epochs", "1", "--devices", "3")


STEPS = {"noprop_dt_all_blocks_vmap", "noprop_dt_all_blocks_unroll", "noprop_dt_one_block", "backprop_scan",
         "backprop_unroll", "noprop_ct", "noprop_fm", "adjoint"}


def test_bench_speed_runs_end_to_end_on_tiny_shapes(background):
    """bench/speed.py cannot rot: every section runs (tiny shapes) and reports sane figures."""
    r = background("bench")
    assert r.returncode == 0 and "inference" in r.stdout, r.stderr[-3000:]
    out = json.load(open(r.args[r.args.index("--out") + 1]))
    s = out["train_step"]["tiny"]
    assert set(s) == STEPS
    for name, r in s.items():
        assert r["ms_per_step"] > 0 and (name == "adjoint" or r["gflop_per_step"] > 0) and r["temp_mb"] >= 0
    # the all-blocks step does T times the one-block work, in either form of the block axis
    for form in ("vmap", "unroll"):
        assert 1.5 < s[f"noprop_dt_all_blocks_{form}"]["gflop_per_step"] / s["noprop_dt_one_block"]["gflop_per_step"] < 2.5
    # the rolled scan's count is one block's times T (the optimiser's share too, so a little more)
    np.testing.assert_allclose(s["backprop_scan"]["gflop_per_step"], s["backprop_unroll"]["gflop_per_step"], rtol=0.15)
    if importlib.util.find_spec("torch"):  # the PyTorch references, where torch is installed
        assert all(s[k]["speed_vs_pytorch"] > 0 for k in STEPS - {"noprop_dt_one_block", "adjoint"})
    assert out["dispatch"]["train_steps_steps_per_s"] > 0 and out["inference"]["features_once"]["ct"]["speedup"] > 0
    assert out["matmul_gflop_per_s"] > 0


def test_profile_names_the_dt_steps_ops_by_primitive_and_pass(background):
    """--profile accounts for the step's op time: matmuls forward and backward, the dropout draws, shares sum to 1."""
    r = background("profile")
    assert r.returncode == 0, r.stderr[-3000:]
    prof = json.load(open(r.args[r.args.index("--out") + 1]))["profile"]
    ops = prof["ops"]
    assert abs(sum(o["share"] for o in ops) - 1) < 1e-6 and 0 < prof["op_ms_total"]
    assert {("forward", "dot_general"), ("backward", "dot_general")} <= {(o["pass"], o["primitive"]) for o in ops}
    assert any("_bernoulli" in o["primitive"] for o in ops)  # dropout's random bits, found by name


# --- results.chain_gap: where Eq. 3's noise costs accuracy ---

def test_chain_gap_measures_the_chain_predict_dt_runs_and_each_block_on_its_own_input():
    from results import chain_gap
    params, state, x, y, sched = tiny_dt()
    block = lambda t: jax.tree.map(lambda a: a[t], (params["blocks"], state))
    params["blocks"]["out"]["b"] = params["blocks"]["out"]["b"].at[2].set(50.0 * jnp.eye(4)[3])  # block 3 says 3
    for stochastic in (False, True):
        logits, preds = chain_gap.chain_logits(params, state, KEY, x, sched, stochastic)
        np.testing.assert_array_equal(preds, noprop.predict_dt(params, state, KEY, x, sched, stochastic))
        assert logits.shape == (3, 8, 4) and bool(jnp.all(logits[2].argmax(-1) == 3))
        assert not bool(jnp.any(logits[1].argmax(-1) == 3))  # per block, not the chain's end
        z0 = jax.random.normal(jax.random.split(KEY)[0], (8, 4))  # predict_dt's z_0: block 1's input
        np.testing.assert_allclose(logits[0], noprop.dt_block(*block(0), x, z0)[0], rtol=1e-4, atol=1e-5)
    q = chain_gap.q_logits(params, state, KEY, x, y, sched)
    z1 = noprop.sample_q(jax.random.split(KEY, 3)[1], jnp.eye(4)[y], sched["alpha_bar"][1])  # block 2 sees z_1
    np.testing.assert_allclose(q[1], noprop.dt_block(*block(1), x, z1)[0], rtol=1e-4, atol=1e-5)


# --- results.reproduce: the paper's Table 1 as a plan ---

def test_reproduce_plans_all_of_table_1_and_runs_a_row_on_a_tiny_budget(tmp_path, capsys, monkeypatch):
    from results import reproduce
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # for the script it starts: meaning, not speed
    reproduce.main(["--dry-run"])
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == 13 * 3 * 3  # 13 rows of Table 1 x 3 datasets x 3 seeds
    assert any("--method adjoint --dataset cifar100 --embedding onehot --epochs 4 " in c for c in plan)
    rng = np.random.default_rng(0)
    write_npz(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
              y_train=rng.integers(0, 10, 40).astype(np.uint8))
    argv = ["--rows", "dt_mnist_onehot", "--seeds", "0", "--epochs", "1", "--data-dir", str(tmp_path),
            "--results-dir", str(tmp_path / "out"), "--checkpoint-root", str(tmp_path / "ck"),
            "--extra", "--T 1 --batch-size 32 --eval-runs 2"]
    os.makedirs(tmp_path / "out")
    reproduce.main(argv)
    assert "running dt_mnist_onehot seed 0" in capsys.readouterr().out
    rec = json.load(open(tmp_path / "out" / "dt_mnist_onehot_s0.json"))
    assert rec["epochs"] == 1 and len(rec["test_accs"]) == 2 and len(rec["train_accs"]) == 2
    row = [r for r in reproduce.table(str(tmp_path / "out")).splitlines() if r.startswith("| NoProp-DT")]
    assert len(row) == 1 and "| 1 (100) | 1 |" in row[0] and "99.47±0.05" in row[0], row
    assert "python -m results.reproduce --rows dt_mnist_onehot --epochs 1 --seeds 0\n" in reproduce.runs(str(tmp_path / "out"))
    fm = dict(rec, variant="fm", args={**rec["args"], "steps": 20})  # fewer inference steps than the paper's: labelled
    json.dump(fm, open(tmp_path / "out" / "fm_mnist_prototype_s0.json", "w"))
    row = [r for r in reproduce.table(str(tmp_path / "out")).splitlines() if r.startswith("| NoProp-FM | prototype")]
    assert len(row) == 1 and "| 1 (100), 20 inference steps | 1 |" in row[0], row
    assert '--rows fm_mnist_prototype --epochs 1 --seeds 0 --extra "--steps 20"\n' in reproduce.runs(str(tmp_path / "out"))
    json.dump(rec, open(tmp_path / "out" / "dt_cifar10_onehot_s0.json", "w"))  # the dataset column names it as the paper does
    assert "| NoProp-DT | onehot | CIFAR-10 | 1 (150) | 1 |" in reproduce.table(str(tmp_path / "out"))
    old = {k: v for k, v in rec.items() if k != "train_accs"}  # a run from before train accuracy: counted apart
    json.dump(old, open(tmp_path / "out" / "dt_cifar10_onehot_s1.json", "w"))
    row = [r for r in reproduce.table(str(tmp_path / "out")).splitlines() if "| CIFAR-10 | 1 (150) | 2 |" in r]
    assert len(row) == 1 and f"| {100 * np.mean(rec['train_accs']):.2f}" in row[0] and "(1 of 2 seeds) |" in row[0], row
    reproduce.main(argv)  # finished: nothing runs again
    assert "running" not in capsys.readouterr().out
    shutil.rmtree(tmp_path / "ck")  # checkpoint lost: the longer run starts afresh, and so does its log
    reproduce.main([a if a != "1" else "2" for a in argv])
    log = open(tmp_path / "out" / "dt_mnist_onehot_s0.log").read()
    assert log.count("NoProp-DT mnist") == 1 and "resumed" not in log and log.count("\nepoch") == 2, log
    png = reproduce.figure(str(tmp_path / "out"), str(tmp_path / "curves.png"))  # None without matplotlib (optional)
    assert png is None if importlib.util.find_spec("matplotlib") is None else os.path.getsize(png) > 10_000


def test_memory_of_every_training_step_and_the_adjoint_holds_no_trajectory(background):
    r = background("memory")
    assert r.returncode == 0 and "adjoint" in r.stdout, r.stderr[-3000:]
    temp = {k: v["temp_mb"] for k, v in json.load(open(r.args[r.args.index("--out") + 1]))["train_step"].items()}
    assert set(temp) == STEPS
    assert temp["noprop_dt_one_block"] < min(temp["backprop_scan"], temp["backprop_unroll"]) and all(v > 0 for v in temp.values())


# --- Figures (--plot; matplotlib is optional) ---

def test_plot_without_matplotlib_is_a_one_line_error(monkeypatch, capsys):
    import train_dt
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit):
        cli.parse_args(train_dt.DEFAULTS, "", ["--plot"], {"noprop": "dt"})
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot_writes_curves_and_schedule(tmp_path):
    pytest.importorskip("matplotlib")
    tiny_run(tmp_path, "--epochs", "2", "--plot", "--out", str(tmp_path / "run.json"))
    for name in ("curves", "schedule"):
        assert (tmp_path / f"run_{name}.png").stat().st_size > 1000
