"""results/: the Table 1 plan (reproduce) and the chain-gap study, on tiny budgets."""
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noprop
from harness.testing import CACHE, FAST_COMPILE, write_npz

pytest_plugins = ["harness.testing"]
KEY = jax.random.PRNGKey(0)


def test_the_chain_of_the_figures_and_chain_gap_is_predicts_and_each_block_sees_its_own_input():
    """viz.trajectories.chain (trajectory figures, results/chain_gap.py): predict_dt's and predict_ct's own chain,
    and block t's logits on the z_{t-1} the chain gave it."""
    from results import chain_gap
    from viz import trajectories
    params, state = noprop.init_dt(KEY, (16, 16, 1), 4, T=3)
    x, y, sched = jax.random.uniform(KEY, (8, 16, 16, 1)), jnp.arange(8) % 4, noprop.cosine_schedule(3)
    block = lambda t: jax.tree.map(lambda a: a[t], (params["blocks"], state))
    params["blocks"]["out"]["b"] = params["blocks"]["out"]["b"].at[2].set(50.0 * jnp.eye(4)[3])  # block 3 says 3
    for stochastic in (False, True):
        zT, path, logits = trajectories.chain("dt", params, state, KEY, x, 3, stochastic)
        preds = jnp.argmax(noprop.dense(params["classifier"], zT), -1)
        np.testing.assert_array_equal(preds, noprop.predict_dt(params, state, KEY, x, sched, stochastic))
        assert path.shape == (4, 8, 4) and bool(jnp.all(path[-1] == zT))
        assert logits.shape == (3, 8, 4) and bool(jnp.all(logits[2].argmax(-1) == 3))
        assert not bool(jnp.any(logits[1].argmax(-1) == 3))  # per block, not the chain's end
        z0 = jax.random.normal(jax.random.split(KEY)[0], (8, 4))  # predict_dt's z_0: block 1's input
        np.testing.assert_allclose(path[0], z0)
        np.testing.assert_allclose(logits[0], noprop.dt_block(*block(0), x, z0)[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits[2], noprop.dt_block(*block(2), x, path[2])[0], rtol=1e-4, atol=1e-5)
    q = chain_gap.q_logits(params, state, KEY, x, y, sched)
    z1 = noprop.sample_q(jax.random.split(KEY, 3)[1], jnp.eye(4)[y], sched["alpha_bar"][1])  # block 2 sees z_1
    np.testing.assert_allclose(q[1], noprop.dt_block(*block(1), x, z1)[0], rtol=1e-4, atol=1e-5)
    ct, _ = noprop.init_ct(KEY, (16, 16, 1), 4)
    zT, path, logits = trajectories.chain("ct", ct, {}, KEY, x, 5, True)
    np.testing.assert_array_equal(jnp.argmax(noprop.dense(ct["classifier"], zT), -1), noprop.predict_ct(ct, {}, KEY, x, 5))
    feats = noprop.continuous_features(ct["model"], x)  # the model's guess at grid time t_3 = 3/5 on z_3
    want = noprop.continuous_logits(ct["model"], feats, path[3], jnp.full((1,), 0.6), (16, 16, 1))
    assert path.shape == (6, 8, 4) and logits.shape == (5, 8, 4)
    np.testing.assert_allclose(logits[3], want, rtol=1e-4, atol=1e-5)
    out = trajectories.trajectories("dt", params, state, KEY, x, np.asarray(y), 3, runs=2)
    assert out[False]["block_acc"][2] == np.mean(np.asarray(y) == 3) and 0 <= out[True]["final"] <= 1
    W = np.asarray(noprop.class_embeddings(params))  # one-hot: class k lands on the k-th corner of a square
    centre, P = trajectories.plane(W)
    np.testing.assert_allclose((W - centre) @ P, [[1, 0], [0, 1], [-1, 0], [0, -1]], atol=1e-6)


# --- results.reproduce: the paper's Table 1 as a plan ---

def test_reproduce_plans_all_of_table_1_and_runs_a_row_on_a_tiny_budget(tmp_path, capsys, monkeypatch):
    from results import reproduce
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # for the scripts it starts: meaning, not speed,
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", CACHE)  # and the later ones reuse the first one's compiles
    reproduce.main(["--dry-run"])
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == 13 * 3 * 3  # 13 rows of Table 1 x 3 datasets x 3 seeds
    assert any("--method adjoint --dataset cifar100 --embedding onehot --epochs 4 " in c for c in plan)
    rng = np.random.default_rng(0)
    write_npz(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
              y_train=rng.integers(0, 10, 40).astype(np.uint8))
    argv = ["--rows", "dt_mnist_onehot", "--seeds", "0", "--epochs", "1", "--data-dir", str(tmp_path),
            "--results-dir", str(tmp_path / "out"), "--checkpoint-root", str(tmp_path / "ck"),
            "--extra", "--T 1 --block mlp --batch-size 32 --eval-runs 2"]
    os.makedirs(tmp_path / "out")
    reproduce.main(argv)
    assert "running dt_mnist_onehot seed 0" in capsys.readouterr().out
    rec = json.load(open(tmp_path / "out" / "dt_mnist_onehot_s0.json"))
    assert rec["epochs"] == 1 and len(rec["test_accs"]) == 2 and len(rec["train_accs"]) == 2
    for epochs, code in (("1", 0), ("2", 1)):  # bench/gpu.sh's question: finished, for so many epochs?
        with pytest.raises(SystemExit) as done:
            reproduce.main(["--finished", str(tmp_path / "out" / "dt_mnist_onehot_s0.json"), epochs])
        assert done.value.code == code
    row = [r for r in reproduce.table(str(tmp_path / "out")).splitlines() if r.startswith("| NoProp-DT")]
    # a row whose runs left the paper's settings says so, as the flags that would make it again
    assert len(row) == 1 and "| 1 (100), --batch-size 32 --T 1 --block mlp | 1 |" in row[0] and "99.47±0.05" in row[0], row
    os.makedirs(tmp_path / "out" / "gpu")  # a run made on a GPU (bench/gpu.sh): a row of its own, saying where
    json.dump(dict(rec, device="NVIDIA H200"), open(tmp_path / "out" / "gpu" / "dt_mnist_onehot_s0.json", "w"))
    row = [r for r in reproduce.table(str(tmp_path / "out")).splitlines() if r.startswith("| NoProp-DT")]
    assert len(row) == 2 and "| 1 (100), --batch-size 32 --T 1 --block mlp, on an NVIDIA H200 | 1 |" in row[1], row
    assert ('--rows dt_mnist_onehot --epochs 1 --seeds 0 --extra "--batch-size 32 --T 1 --block mlp"\n'
            in reproduce.runs(str(tmp_path / "out")))
    paper = {k: v for k, v in reproduce.DEFAULTS["train_dt.py"].items() if k in rec["args"]}
    json.dump(dict(rec, args={**rec["args"], **paper}), open(tmp_path / "out" / "dt_cifar10_onehot_s0.json", "w"))
    assert "| NoProp-DT | onehot | CIFAR-10 | 1 (150) | 1 |" in reproduce.table(str(tmp_path / "out"))  # the paper's: no note
    json.dump(dict(rec, args={**rec["args"], **paper, "deterministic": True}), open(tmp_path / "out" / "dt_mnist_dim20_s0.json", "w"))
    assert "| NoProp-DT | dim20 | MNIST | 1 (100), --deterministic | 1 |" in reproduce.table(str(tmp_path / "out"))
    json.dump(dict(rec, args={**rec["args"], **paper, "train_eval": 2000}), open(tmp_path / "out" / "dt_mnist_dim20_s0.json", "w"))
    assert "| NoProp-DT | dim20 | MNIST | 1 (100), train % on 2,000 images | 1 |" in reproduce.table(str(tmp_path / "out"))
    fm = dict(rec, variant="fm", args={**reproduce.DEFAULTS["train_fm.py"], "steps": 20, "lr": 0.002})
    json.dump(fm, open(tmp_path / "out" / "fm_mnist_prototype_s0.json", "w"))
    row = [r for r in reproduce.table(str(tmp_path / "out")).splitlines() if r.startswith("| NoProp-FM | prototype")]
    assert len(row) == 1 and "| 1 (100), --lr 0.002 --steps 20 | 1 |" in row[0], row
    assert '--rows fm_mnist_prototype --epochs 1 --seeds 0 --extra "--lr 0.002 --steps 20"\n' in reproduce.runs(str(tmp_path / "out"))
    old = {k: v for k, v in rec.items() if k != "train_accs"}  # a run from before train accuracy: counted apart
    old["args"] = {**rec["args"], **paper}
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


def test_fm_blind_floor_is_the_bayes_velocity():
    """results/fm_blind_floor.py: with one class the label-blind velocity is exact (loss 0); with ten, the Bayes
    posterior's velocity beats tempered posteriors and v = 0 on the same draws."""
    from results.fm_blind_floor import blind_floor
    assert blind_floor(1, n=1000)[0] < 1e-9
    floor, zero = blind_floor(10, n=50_000)
    assert 1.5 < floor < 2.2 and zero > 10  # E |u_y - z_0|^2 = 1 + d
    assert all(blind_floor(10, n=50_000, temperature=T)[0] > floor for T in (0.7, 1.4))


@pytest.mark.parametrize("variant", ["ct", "fm"])
def test_image_use_sees_only_what_the_image_path_carries(variant):
    """results/image_use.py: with the image path emptied (as coupled L2 leaves it) the guess from z_t is the same
    whatever the images; with a path that dominates, shuffling the images changes guesses. Near t = 1, z_t's
    nearest class is the label."""
    from results.image_use import guesses
    x = jax.random.normal(KEY, (64, 28, 28, 1))
    y = jnp.arange(64) % 10
    ends = {"log_snr_init": 4.0} if variant == "ct" else {}  # alpha_bar(0.99) > 0.98: z_t's nearest class is the label
    p, _ = (noprop.init_ct if variant == "ct" else noprop.init_fm)(KEY, x.shape[1:], 10, label_scale=10.0, **ends)
    img = p["model"]["img"]
    dead = {**p["model"], "img": jax.tree.map(jnp.zeros_like, img)}
    loud = {**p["model"], "img": {**img, "fc": {**img["fc"], "W": 100 * img["fc"]["W"]}}}  # the image dominates
    perm = np.random.default_rng(0).permutation(64)
    for model, same in ((dead, True), (loud, False)):
        feats = noprop.continuous_features(model, x)
        guess, nearest = guesses(variant, {**p, "model": model}, feats, y, 0.4, x.shape[1:])
        assert bool((guess(feats) == guess(feats[perm])).all()) == same
    assert (guesses(variant, p, feats, y, 0.99, x.shape[1:])[1] == y).all()


# --- results.ablations: the paper's Figs. 6 and 7 (v2) ---

def test_ablations_run_each_figures_setting_and_put_each_run_in_its_cell(tmp_path, monkeypatch):
    from harness import cli
    from results import ablations
    import train_dt
    for name in ablations.RUNS:  # the paper's settings but the one flag each bar changes
        a = cli.parse_args(train_dt.DEFAULTS, "", ablations.command(name, 5, "", str(tmp_path))[2:], {"noprop": "dt"})
        emb, what = name[len("dt_mnist_"):].split("_")
        assert (a.embedding, a.epochs, a.seed, a.T, a.batch_size, a.lr, a.eval_runs) == (emb, 5, 0, 10, 128, 1e-3, 5)
        assert (a.classifier, a.embedding_init) == ((what, "prototype") if what in ("softmax", "posterior") else ("softmax", what))
    monkeypatch.setattr(ablations, "HERE", str(tmp_path))
    os.makedirs(tmp_path / "ablations")
    for i, name in enumerate(ablations.RUNS):  # a distinct accuracy per run: each must land in its own cell
        rec = {"epochs": 5, "device": "cpu", "test_acc_mean": 0.9 + i / 1000, "train_acc_mean": 0.95,
               "history": [{"test_acc_deterministic": 0.97}], **({"test_acc_stderr": 1e-4} if i else {})}
        json.dump(rec, open(tmp_path / "ablations" / f"{name}.json", "w"))
    lines = {line.split(" | ")[0][2:]: line.split(" | ") for line in ablations.tables(5).splitlines() if line.startswith("| ")}
    assert lines["onehot"][1:5] == ["90.00", "95.00", "97.00", "90.10±0.01"] and lines["onehot"][-1] == "≈99.46 |"
    assert lines["dim20"][1] == "90.20±0.01" and lines["dim20"][4] == "90.30±0.01"
    assert lines["prototype"][1] == lines["prototype (class medoids)"][1] == "90.40±0.01"  # Fig. 7's prototype bar
    orth, rand = lines["orthogonal rows of the medoids' mean norm"], lines["random rows of the medoids' mean norm"]
    assert orth[1] == "90.60±0.01" and rand[1] == "90.70±0.01" and rand[-1] == "≈99.54 |"


def test_adjoint_choices_probe_is_the_adjoint_at_its_defaults_and_each_choice_changes_it():
    """results/adjoint_choices.py: at its defaults, its loss, gradient and predictions are noprop's adjoint's; each
    choice it varies changes the loss."""
    from results import adjoint_choices as ac
    x, y = jax.random.uniform(KEY, (4, 28, 28, 1)), jnp.arange(4)
    params, state = noprop.init_adjoint(KEY, (28, 28, 1), 10, "onehot")
    value_grad = lambda f: jax.value_and_grad(lambda p: f(p, state, KEY, x, y, steps=4)[0])(params)  # noqa: E731
    (l_ours, g_ours), (l_ref, g_ref) = value_grad(ac.loss), value_grad(noprop.loss_adjoint)
    assert l_ours == l_ref and all(jax.tree.leaves(jax.tree.map(jnp.array_equal, g_ours, g_ref)))
    np.testing.assert_array_equal(ac.predict(params, state, KEY, x, steps=4), noprop.predict_adjoint(params, state, KEY, x, steps=4))
    for change in ({"z0": 0.0}, {"dropout": False}, {"horizon": 10.0}):
        assert abs(ac.loss(params, state, KEY, x, y, steps=4, **change)[0] - l_ref) > 1e-4, change


def test_l2_grip_weighs_the_data_gradient_against_the_decay():
    """results/l2_grip.py: for a loss whose gradient is c w, the data gradient is c/decay times the decay's pull, and
    every coordinate is under the decay exactly when c < decay; the gain scales weight matrices only."""
    from results.l2_grip import grip, scale_weights
    params = {"model": {"a": {"W": jax.random.normal(KEY, (5, 3)), "b": jnp.ones(3)}},
              "classifier": {"W": jnp.ones((2, 2)), "b": jnp.ones(2)}, "schedule": {"gamma_0": jnp.float32(-2.0)}}
    for c, share in ((0.5e-3, 1.0), (2e-3, 0.0)):
        (g, l2, under), = grip(lambda p, b: jax.tree.map(lambda w: c * w, p), params, [0, 1], 1e-3).values()
        assert g / l2 == pytest.approx(c / 1e-3, rel=1e-5) and under == share
    scaled = scale_weights(params, 2.0)
    assert jnp.allclose(scaled["model"]["a"]["W"], 2 * params["model"]["a"]["W"]) and jnp.all(scaled["model"]["a"]["b"] == 1)
    assert jnp.all(scaled["classifier"]["W"] == 2) and scaled["schedule"] == params["schedule"]
