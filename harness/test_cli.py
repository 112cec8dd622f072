"""The scripts' flags, checkpoints, resume and NaN guard (harness.cli, harness.checkpoint,
harness.loop), and --plot: as a user meets them, through the scripts' main()."""
import os
import sys

import jax
import numpy as np
import pytest

from harness import cli
from harness.testing import write_npz

pytest_plugins = ["harness.testing"]


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


def test_unwritable_out_or_checkpoint_dir_is_refused_before_training(capsys, tmp_path):
    import train_dt
    write_npz(tmp_path / "mnist.npz")
    (tmp_path / "file").write_text("")
    for argv, message in ((["--out", str(tmp_path / "file" / "run.json")], "file is a file, not a folder"),
                          (["--checkpoint-dir", str(tmp_path / "file" / "ck")], "file is a file, not a folder"),
                          (["--checkpoint-dir", str(tmp_path / "file")], "file is a file, not a folder"),
                          (["--out", str(tmp_path)], "is a folder; name the JSON file")):
        with pytest.raises(SystemExit):
            train_dt.main(["--data-dir", str(tmp_path)] + argv)
        out, err = capsys.readouterr()
        assert message in err.strip().splitlines()[-1] and "loading" not in out, err  # before the data, before training


def test_help_gives_every_flag_a_meaning_and_its_default(capsys):
    import train_ct, train_dt, train_fm
    for script in (train_dt, train_ct, train_fm):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside words
        for k, v in script.DEFAULTS.items():
            assert f"--{k.replace('_', '-')}" in out and "".join(cli.HELP[k].split()) in out, k
        assert "(default:128)" in out and "(default:0.001)" in out


@pytest.mark.subprocess("cli", ["train_dt.py", "--dataset", "imagenet"])
def test_cli_error_from_the_real_script_has_no_traceback(subprocess_result):
    r = subprocess_result("cli")
    assert r.returncode != 0 and "invalid choice: 'imagenet'" in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- Checkpoints, resume and the NaN guard (one code path: harness.loop.fit) ---

def tiny_run(tmp_path, *extra, block="mlp"):
    """train_dt.main on 96 random images, T = 1. The MLP block traces and runs ~4x faster than Fig. 6's CNN; these
    tests check the harness, so only the resume test (batch-norm state in the checkpoint) takes the CNN."""
    rng = np.random.default_rng(0)
    if not (tmp_path / "mnist.npz").exists():
        write_npz(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (96, 28, 28, 1), dtype=np.uint8),
                  y_train=rng.integers(0, 10, 96).astype(np.uint8), y_test=np.arange(2, dtype=np.uint8))
    import train_dt
    return train_dt.main(["--data-dir", str(tmp_path), "--T", "1", "--block", block, "--batch-size", "32",
                          "--eval-runs", "1", "--quiet"] + list(extra))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    ck, steps = str(tmp_path / "ck"), []
    from harness import loop
    jit_step = loop.jit_step
    monkeypatch.setattr(loop, "jit_step", lambda *a, **kw: steps.append(jit_step(*a, **kw)) or steps[-1])
    _, full = tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(tmp_path / "ck_full"), block="cnn")  # every epoch
    assert steps[0]._cache_size() == 1  # one compile of the training step: epoch 2's state is placed as epoch 1's
    tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", ck, block="cnn")
    record, resumed = tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", ck, "--resume", block="cnn")
    assert len(record["history"]) == 2 and len(record["history"][0]["terms"]["L_t"]) == 1  # per-term means
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_incompatible_or_damaged_checkpoints_are_refused(tmp_path):
    ck = tmp_path / "ck"
    tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", str(ck))
    with pytest.raises(SystemExit, match="checkpoint has embedding='onehot', this run has 'dim20'"):
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume", "--embedding", "dim20")
    with pytest.raises(SystemExit, match="was trained with --lr 0.001, this run has 0.002"):  # a silent mix otherwise
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume", "--lr", "2e-3")
    with pytest.raises(SystemExit, match=r"\['blocks'\].+ expected float32\(2, "):  # T = 1 there: one block's weights
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume", "--T", "2")
    data = (ck / "checkpoint.npz").read_bytes()
    (ck / "checkpoint.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume")


def test_nan_guard_names_epoch_step_and_term_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"non-finite loss at epoch 1, step \d+ \(bad: .+\); no checkpoint written yet"):
        tiny_run(tmp_path, "--epochs", "2", "--lr", "1e30", "--checkpoint-dir", str(tmp_path / "ck0"))
    ck = tmp_path / "ck"
    tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", str(ck))
    from harness import data
    load = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", lambda *a: (np.full_like(load(*a)[0], np.nan),) + load(*a)[1:])
    with pytest.raises(SystemExit, match=r"non-finite loss at epoch 2, step 1 \(bad: .+\); last good checkpoint kept at "
                                         + str(ck / "checkpoint.npz")):
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume")


def test_a_failed_checkpoint_write_is_one_line_and_leaves_the_last_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", str(ck))
    before = (ck / "checkpoint.npz").read_bytes()

    def full_disk(f, **arrays):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(SystemExit, match="could not write .+checkpoint.npz: No space left on device"):
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume")
    assert os.listdir(ck) == ["checkpoint.npz"] and (ck / "checkpoint.npz").read_bytes() == before


def test_devices_flag_must_divide_the_split_axis(tmp_path):
    with pytest.raises(SystemExit, match="--devices 3 must divide T = 1|only 1 device"):
        tiny_run(tmp_path, "--epochs", "1", "--devices", "3")


def test_a_checkpoint_restores_with_the_optimiser_its_flags_built(tmp_path):
    """viz.figures.restore rebuilds a run from its recorded flags (variants.from_args, as the scripts do): a CT run
    with no clip and no weight average, whose optimiser state has another structure than the defaults'."""
    import train_ct
    from viz.figures import restore
    write_npz(tmp_path / "mnist.npz", x_train=np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
              y_train=np.arange(64, dtype=np.uint8) % 10)
    _, tree = train_ct.main(["--data-dir", str(tmp_path), "--epochs", "1", "--batch-size", "32", "--steps", "3",
                             "--eval-runs", "1", "--quiet", "--clip", "0", "--ema", "0", "--log-snr-init", "3",
                             "--checkpoint-dir", str(tmp_path / "ct")])
    meta, _, restored, _, _ = restore(str(tmp_path / "ct" / "checkpoint.npz"), str(tmp_path))
    assert meta["args"]["clip"] == 0
    for a, b in zip(jax.tree.leaves(tree["params"]), jax.tree.leaves(restored["eval"])):  # no average: the weights
        np.testing.assert_array_equal(a, b)


# --- Figures (--plot; matplotlib is optional) ---

def test_plot_without_matplotlib_is_a_one_line_error(monkeypatch, capsys):
    import train_dt
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit):
        cli.parse_args(train_dt.DEFAULTS, "", ["--plot"], {"noprop": "dt"})
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot_writes_curves_and_schedule_and_the_trajectories_of_a_checkpoint(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from viz import trajectories
    tiny_run(tmp_path, "--epochs", "2", "--plot", "--out", str(tmp_path / "run.json"), "--checkpoint-dir", str(tmp_path / "ck"))
    for name in ("curves", "schedule"):
        assert (tmp_path / f"run_{name}.png").stat().st_size > 1000
    trajectories.main([str(tmp_path / "ck" / "checkpoint.npz"), "--data-dir", str(tmp_path), "--out", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").stat().st_size > 10_000 and capsys.readouterr().out.endswith("t.png\n")
    import train_ct  # CT's figure: the chain on the run's own inference grid (--steps, from the checkpoint)
    train_ct.main(["--data-dir", str(tmp_path), "--epochs", "1", "--batch-size", "32", "--steps", "3", "--eval-runs", "1",
                   "--quiet", "--clip", "0", "--checkpoint-dir", str(tmp_path / "ct")])  # --clip 0: another optimiser
    trajectories.main([str(tmp_path / "ct" / "checkpoint.npz"), "--data-dir", str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 10_000
