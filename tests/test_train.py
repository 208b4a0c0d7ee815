"""The training loop end to end on tiny synthetic data: outputs, logs, resume after SIGTERM/SIGKILL."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import checkpoint_steps, read_metrics, run_cli


def final_arrays(workdir: Path) -> dict[str, np.ndarray]:
    """Every array of the last periodic checkpoint (variables and optimiser state), flat."""
    import orbax.checkpoint as ocp
    ckpt_dir = workdir / "checkpoints"
    step = checkpoint_steps(workdir)[-1]
    out = {}
    for item in ("model", "train"):
        tree = ocp.StandardCheckpointer().restore(ckpt_dir / str(step) / item)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[f"{item}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return out


def test_one_step_run_writes_everything(tmp_path, train_config):
    from unet_jax.optim import poly_lr
    from unet_jax.train import train_and_evaluate

    config = train_config(num_steps=1)
    summary = train_and_evaluate(config, tmp_path / "run")
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (1, "validation")]
    train, val = records
    assert np.isfinite(train["loss"]) and train["loss"] > 0
    assert train["lr"] == pytest.approx(poly_lr(0, config.train), rel=1e-6)
    assert {"decode.loss_ce", "aux.loss_ce", "decode.acc_seg"} <= set(train)
    assert train["loss"] == pytest.approx(train["decode.loss_ce"] + train["aux.loss_ce"],
                                          rel=1e-5)
    for key in ("aAcc", "mIoU", "mDice", "mAcc"):
        assert 0 <= val[key] <= 100
        assert summary[key] == val[key]
    assert set(val["Dice"]) == {"background", "vessel"}
    # the synthetic set has a field of view: FOV metrics on the validation line
    assert list(val["fov"]) == ["Se", "Sp", "Acc", "AUC", "F1"] and val["fov"] == summary["fov"]
    assert all(v is None or 0 <= v <= 100 for v in val["fov"].values())
    assert (run / "checkpoints" / "1" / "model").is_dir()
    assert (run / "best" / "1" / "model").is_dir()
    assert len(list((run / "overlays" / "step_1").glob("*.png"))) == 1
    assert (run / "training_curves.png").stat().st_size > 0
    assert list(run.glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["train"]["num_steps"] == 1

    # Eval mode reads the latest checkpoint back and reproduces the validation numbers.
    from unet_jax.train import evaluate_checkpoint
    again = evaluate_checkpoint(config, run)
    assert {k: again[k] for k in ("aAcc", "mDice", "fov")} == {
        k: val[k] for k in ("aAcc", "mDice", "fov")}
    assert read_metrics(run)[-1]["mode"] == "eval" and read_metrics(run)[-1]["fov"] == val["fov"]


def _signal_after(monkeypatch, step: int, signum: int) -> None:
    """Send `signum` to this process right after the metrics line of `step` is written."""
    from unet_jax import run_logs
    write = run_logs.MetricsLog.write

    def write_and_signal(self, record):
        write(self, record)
        if int(record["step"]) == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(run_logs.MetricsLog, "write", write_and_signal)


def test_resume_after_sigterm_and_sigkill_is_exact(tmp_path, run_env, train_config,
                                                   monkeypatch):
    """SIGTERM (in process) and SIGKILL (a CLI subprocess: the point) both resume exactly."""
    from unet_jax.train import Preempted, train_and_evaluate

    flags = {"log_every": 2, "eval_every": 5}
    ref = tmp_path / "ref"
    train_and_evaluate(train_config(**flags), ref)
    ref_records = read_metrics(ref)
    assert [(r["step"], r["split"]) for r in ref_records] == [
        (2, "train"), (4, "train"), (5, "validation"), (6, "train"), (6, "validation")]

    run = tmp_path / "run"
    # SIGTERM while step 2 is logged: the run stops after step 3 and saves it (not a periodic
    # step; the log sums then hold step 3 only).
    with monkeypatch.context() as patch:
        _signal_after(patch, 2, signal.SIGTERM)
        with pytest.raises(Preempted, match="after step 3.*resume"):
            train_and_evaluate(train_config(**flags), run)
    assert checkpoint_steps(run) == [2, 3]
    # SIGKILL after step 5 is evaluated, once the asynchronous save of step 4 (whose buffers the
    # step-5 update donated) has committed: the next run resumes from step 4.
    cli_flags = [f"--config.train.{k}={v}" for k, v in flags.items()]
    killed = run_cli(run_env, run, *cli_flags, signal_at="KILL:5:4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoint_steps(run) == [2, 3, 4]
    assert [r["step"] for r in read_metrics(run)][-1] == 5
    train_and_evaluate(train_config(**flags), run)

    assert read_metrics(run) == ref_records
    ref_arrays, run_arrays = final_arrays(ref), final_arrays(run)
    assert sorted(ref_arrays) == sorted(run_arrays)
    for key, value in ref_arrays.items():
        np.testing.assert_array_equal(run_arrays[key], value, err_msg=key)
    best = lambda d: sorted(p.name for p in (d / "best").iterdir() if p.name.isdigit())
    assert best(run) == best(ref)


def test_divergence_names_the_last_good_checkpoint_and_resumes_from_it(tmp_path, train_config,
                                                                        monkeypatch):
    """Nothing non-finite is committed; a checkpoint that leads into the divergence (by its
    loss history, not only by finiteness) is set aside; the error names the last good one, and
    the same command with a lower lr resumes from it to the undisturbed run's exact end. (All
    runs are 6-step runs, at three learning rates: three programs.)"""
    from unet_jax.errors import DivergenceError
    from unet_jax.train import Preempted, train_and_evaluate

    steady = dict(num_steps=6, eval_every=0, checkpoint_every=1)
    fresh = tmp_path / "fresh"  # lr 1e30 from the start: step 1's parameters give inf at step 2
    with pytest.raises(DivergenceError, match=r"loss is not finite from step 2; .*no checkpoint "
                                              r"precedes the divergence.*lower --config.train.lr"):
        train_and_evaluate(train_config(lr=1e30, **steady), fresh)
    assert not list((fresh / "checkpoints").glob("[0-9]*"))
    assert len(list((fresh / "diverged").iterdir())) == 1

    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # 3 steps at lr 0.01 (a SIGTERM stops it after step 3)
        _signal_after(patch, 2, signal.SIGTERM)
        with pytest.raises(Preempted, match="after step 3"):
            train_and_evaluate(train_config(lr=0.01, **steady), run)
    assert checkpoint_steps(run) == [1, 2, 3]
    # Continued at lr 1e6: the loss of step 5 is finite but ~1e8 (checkpoint 4 already leads
    # into the divergence), the parameters overflow at step 6.
    with pytest.raises(DivergenceError) as err:
        train_and_evaluate(train_config(lr=1e6, **steady), run)
    message = str(err.value)
    found = re.search(r"last good checkpoint is (\S+) \(step (\d+), all finite\)", message)
    assert found and "the loss left its healthy range" in message, message
    assert re.search(r"by step 5\b", message), message
    # keep_checkpoints 3: 3, 4, 5, and 4, 5 set aside
    assert int(found.group(2)) == 3 and checkpoint_steps(run) == [3]
    assert sorted(p.name.split("_")[1] for p in (run / "diverged").iterdir()) == ["4", "5"]
    assert all(np.isfinite(a).all() for a in final_arrays(run).values())
    train_and_evaluate(train_config(lr=0.01, **steady), run)
    ref = tmp_path / "ref"
    train_and_evaluate(train_config(lr=0.01, **steady), ref)
    assert read_metrics(run) == read_metrics(ref)
    ref_arrays, run_arrays = final_arrays(ref), final_arrays(run)
    for key, value in ref_arrays.items():
        np.testing.assert_array_equal(run_arrays[key], value, err_msg=key)


def test_default_workdir_and_bad_batch(tmp_path, train_config):
    from unet_jax.train import default_workdir, train_and_evaluate

    config = train_config(batch_size=0)
    name = default_workdir(config, tmp_path).name
    assert name.startswith("synthetic_fcn_") and len(name) == len("synthetic_fcn_20250101-000000")
    with pytest.raises(ValueError, match="train.batch_size"):
        train_and_evaluate(config, tmp_path / "run")


def test_host_train_splits_partition_the_training_set(train_config):
    """`data.host_shard`: the per-host record rows are disjoint and cover the training set."""
    from unet_jax import data
    from unet_jax.data.records import host_rows

    train = data.source(train_config().data, "train")
    names = [train.shard(host_rows(len(train), p, 3)).names() for p in range(3)]
    assert all(names) and sorted(sum(names, [])) == sorted(train.names())
