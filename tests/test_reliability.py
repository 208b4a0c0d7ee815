"""Run folders that protect their work: damaged checkpoints are detected and passed over, nothing
non-finite is committed, one run per workdir, no resume into another model, OS errors in one
line."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY, checkpoint_steps, read_metrics, run_cli, small_disk
from unet_jax.io import weights
from unet_jax.errors import CheckpointError, DamagedCheckpointError, DivergenceError, WorkdirError
from unet_jax.io.lock import LOCK_FILE, WorkdirLock
from unet_jax.train import train_and_evaluate

STEPS = dict(num_steps=6, log_every=2, eval_every=6, checkpoint_every=2, keep_checkpoints=0)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, run_env):
    """A finished tiny run with checkpoints 2, 4, 6 (and its config builder)."""
    from conftest import tiny_config

    def make(**train):
        return tiny_config(TINY, {"data.tfds_data_dir": run_env["UNET_JAX_TEST_TFDS"],
                                  **{f"train.{k}": v for k, v in {**STEPS, **train}.items()}})
    run = tmp_path_factory.mktemp("finished") / "run"
    train_and_evaluate(make(), run)
    return run, make


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def _largest_data_file(folder: Path) -> Path:
    files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    files = files or [p for p in folder.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_a_flipped_byte_is_detected_and_resume_falls_back(finished, tmp_path, capfd):
    run, make = finished
    copy = _copy(run, tmp_path)
    data = _largest_data_file(copy / "checkpoints" / "6" / "model")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(DamagedCheckpointError, match="checkpoints/6/model"):
        weights.restore_state(copy / "checkpoints" / "6", _model_state(make))
    train_and_evaluate(make(), copy)  # resumes from 4 and trains 5, 6 again
    err = capfd.readouterr().err
    assert "checkpoints/6" in err and "resuming from the checkpoint before it" in err
    assert checkpoint_steps(copy) == [2, 4, 6]
    moved = list((copy / "damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("checkpoints_6_")  # kept, not deleted
    assert read_metrics(copy) == read_metrics(run)


def test_an_unreadable_checkpoint_falls_back_and_none_intact_is_one_error(finished, tmp_path):
    run, make = finished
    copy = _copy(run, tmp_path)
    for step in (4, 6):  # truncated array data
        data = _largest_data_file(copy / "checkpoints" / str(step) / "train")
        data.write_bytes(data.read_bytes()[:10])
    train_and_evaluate(make(), copy)
    assert read_metrics(copy) == read_metrics(run)
    assert sorted(p.name.split("_")[1] for p in (copy / "damaged").iterdir()) == ["4", "6"]
    for step in checkpoint_steps(copy):  # now damage every checkpoint
        (copy / "checkpoints" / str(step) / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        train_and_evaluate(make(), copy)
    # ... and the same command again does not start over on top of the old run's history
    with pytest.raises(CheckpointError, match=r"no usable checkpoint to resume from \(\d+ damaged"):
        train_and_evaluate(make(), copy)
    assert read_metrics(copy) == read_metrics(run)


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [
    lambda c: (c / "model" / "manifest.ocdbt").unlink(),
    lambda c: (c / "model" / "_METADATA").unlink(),
    lambda c: _flip(c / "model" / "manifest.ocdbt"),
    lambda c: _flip(c / "model" / "_METADATA"),
    lambda c: (c / "meta" / "metadata").write_text(json.dumps({"step": 6}))],  # no digest
    ids=["manifest deleted", "_METADATA deleted", "manifest flipped", "_METADATA flipped",
         "digest removed"])
def test_damaged_orbax_metadata_or_a_missing_digest_is_a_damaged_checkpoint(finished, tmp_path,
                                                                            damage, capfd):
    """Not 'another model' (a damaged _METADATA reads as an empty tree) and never used
    unverified: reported by name, set aside under damaged/, the checkpoint before it resumed."""
    from unet_jax.io.checkpoint import TrainCheckpoints
    from unet_jax.step import create_train_state

    run, make = finished
    copy = _copy(run, tmp_path)
    damage(copy / "checkpoints" / "6")
    from unet_jax.models import build_model
    with pytest.raises(DamagedCheckpointError, match="checkpoints/6/model"):
        weights.load(build_model(make().model), copy / "checkpoints" / "6")
    ckpts = TrainCheckpoints(copy, keep=0)
    try:
        assert ckpts.restore(create_train_state(build_model(make().model), make())) == 4
    finally:
        ckpts.close()
    err = capfd.readouterr().err
    assert "checkpoints/6/model" in err and "does not fit" not in err, err
    assert [p.name.split("_")[1] for p in (copy / "damaged").iterdir()] == ["6"]


def test_ctrl_c_stops_saves_and_resumes_exactly(finished, tmp_path, run_env):
    """SIGINT to the process group (a terminal's Ctrl-C; the CLI runs in a group of its own),
    then to the trainer alone: each stops the run after the next step with a checkpoint, one
    line, exit code 143 and the lock released, and the run resumes to the undisturbed end."""
    import orbax.checkpoint as ocp

    ref, make = finished
    run = tmp_path / "run"
    flags = [f"--config.train.{k}={v}" for k, v in STEPS.items()]
    # the group's run augments in a worker process (which gets the SIGINT too); batches are the
    # same for any worker count
    for signal_at, stopped, workers in (("INT@group:2", 3, 1), ("INT:4", 5, 0)):
        done = run_cli(run_env, run, *flags, f"--config.data.workers={workers}",
                       signal_at=signal_at)
        assert done.returncode == 143, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
        stops = [line for line in done.stderr.splitlines() if "stopped by a signal" in line]
        assert len(stops) == 1 and f"after step {stopped};" in stops[0], done.stderr[-3000:]
        assert stopped in checkpoint_steps(run) and not (run / LOCK_FILE).exists()
    train_and_evaluate(make(), run)
    assert read_metrics(run) == read_metrics(ref)
    for item in ("model", "train"):
        arrays = [weights.flat_paths(ocp.StandardCheckpointer().restore(
            d / "checkpoints" / "6" / item)) for d in (ref, run)]
        assert sorted(arrays[0]) == sorted(arrays[1])
        for key, value in arrays[0].items():
            np.testing.assert_array_equal(arrays[1][key], value, err_msg=key)


def test_commands_build_the_model_the_checkpoint_records(finished, tmp_path):
    """A run folder's config.json says which model it holds: the demo config (base_channels 8)
    loads the tiny run's model (4) unless the user sets the field, and then a difference is
    refused field by field. Without a record, a model that does not fit is one short line with
    the hint first."""
    from unet_jax.segmenter import Segmenter

    run, _ = finished
    demo = str(REPO / "configs" / "demo.py")
    for source in (run, run / "checkpoints" / "4", run / "best"):
        assert Segmenter.load(demo, source).config.model.base_channels == 4
    with pytest.raises(CheckpointError, match=r"model.base_channels: 4 in the checkpoint, 8 now"):
        Segmenter.load(demo, run, overrides={"model.base_channels": 8})
    copy = _copy(run, tmp_path)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoints/6/model does not fit the model built "
                                              r"from the config \(check --config") as err:
        Segmenter.load(demo, copy)
    assert len(str(err.value)) < 600 and "(+" in str(err.value)


def test_resume_with_another_schedule_says_what_changes(finished):
    """PolyLR follows (step, num_steps): a resumed run on a longer schedule continues on it (the
    lr of the next step jumps up), and says so in one line; the same schedule says nothing."""
    from unet_jax.train import _schedule_note

    run, make = finished
    assert _schedule_note(run, make(), 6) is None
    note = _schedule_note(run, make(num_steps=12, lr=0.02), 6)
    assert note.startswith("note: resuming at step 6 with a changed schedule (train.num_steps 6 "
                           "-> 12, train.lr 0.01 -> 0.02)"), note
    from unet_jax.optim import poly_lr
    assert f"lr of step 7: {poly_lr(6, make(num_steps=12, lr=0.02).train):.4g} " in note
    assert note.endswith(f"(the recorded schedule: {poly_lr(6, make().train):.4g})")


def _model_state(make):
    from unet_jax.models import build_model
    return weights.model_state(build_model(make().model))


def test_weights_load_from_a_workdir_passes_over_a_damaged_newest(finished, tmp_path):
    run, make = finished
    copy = _copy(run, tmp_path)
    (copy / "checkpoints" / "6" / "meta" / "metadata").write_text(json.dumps(
        {"step": 6, "digest": {"model": "0" * 64}}))
    from unet_jax.models import build_model
    info = weights.load(build_model(make().model), copy)
    assert info["step"] == 4 and info["path"].endswith("checkpoints/4")


def test_nonfinite_batchnorm_statistics_are_never_committed(finished, tmp_path, monkeypatch):
    """The loss stays finite while a BatchNorm variance becomes inf (as at lr 100): the run stops
    with an error naming it and the last finite checkpoint, and commits neither it nor best."""
    _, make = finished
    from unet_jax import train as train_module
    real = train_module.make_train_step

    def poisoned(train, config):
        step_fn = real(train, config)

        def step(state, batch):
            state = step_fn(state, batch)
            var = state[0]["backbone"]["encoder"][0][0]["convs"][0]["bn"]["var"]
            count = state[1]["step"][...]
            var[...] = jnp.where(count >= 3, jnp.inf, var[...])
            return state
        return step

    monkeypatch.setattr(train_module, "make_train_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"encoder/0/0/convs/0/bn/var.*checkpoints/2 "
                                              r"\(step 2, all finite\)") as err:
        train_and_evaluate(make(), run)
    assert "the loss is not finite" not in str(err.value)
    assert checkpoint_steps(run) == [2] and not list((run / "best").glob("[0-9]*"))


def test_one_run_per_workdir(tmp_path, finished):
    _, make = finished
    run = tmp_path / "run"
    with WorkdirLock(run):
        with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {os.getpid()}"):
            train_and_evaluate(make(), run)
    assert not (run / "metrics.jsonl").exists()
    # A lock left by a run that was killed (its pid is gone) is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                             "since": "then"}))
    lock = WorkdirLock(run)
    lock.acquire()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_resume_with_another_model_is_refused_with_a_diff(finished, tmp_path):
    run, make = finished
    copy = _copy(run, tmp_path)
    before = (copy / "config.json").read_text()
    other = make()
    other.model.base_channels = 8
    other.model.head = "pspnet"
    with pytest.raises(WorkdirError, match=r"model.base_channels: 4 in the workdir, 8 now; "
                                           r"model.head: 'fcn' in the workdir, 'pspnet' now"):
        train_and_evaluate(other, copy)
    assert (copy / "config.json").read_text() == before
    # a run recorded before a model field existed held that field's default: same model
    from unet_jax.train import _check_same_model
    record = json.loads(before)
    for field in ("name", "out_channels"):
        del record["model"][field]
    (copy / "config.json").write_text(json.dumps(record))
    _check_same_model(copy, make())
    with pytest.raises(WorkdirError, match=r"model.base_channels: 4 in the workdir, 8 now"):
        _check_same_model(copy, other)


# The tiny run's state (0.9 MiB) does not fit in a 64 KiB disk: the space check refuses the
# first save before orbax starts, and says how much it needs.
@pytest.mark.parametrize("options,message", [
    ("size=64k", r"No space left on device \(needs 0\.9 MiB, 0\.\d MiB free\)$"),
    ("size=64k,ro", "Read-only file system")])
def test_a_full_or_read_only_disk_is_one_line_with_the_os_error(tmp_path, run_env, options,
                                                                 message):
    with small_disk(tmp_path, options) as mount:
        cmd = [sys.executable, "-m", "unet_jax.main", f"--config={TINY}",
               f"--workdir={mount / 'run'}", "--jax_cache_dir=",
               "--config.train.checkpoint_every=1"]
        done = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("unet_jax.main: error:") and re.search(message, last), last
    assert "Traceback" not in done.stderr


def test_dataset_preparation_on_a_full_disk_is_one_line_and_leaves_nothing_half_written(
        tmp_path, run_env):
    """The tiny synthetic set prepared into a 64 KiB disk: TFDS (or the records writer) fails
    with ENOSPC; the CLI names the data folder in one line; no TFDS `incomplete.*` folder and no
    `.partial` / `.unsorted` records file is left."""
    with small_disk(tmp_path) as mount:
        cmd = [sys.executable, "-m", "unet_jax.main", f"--config={TINY}",
               f"--workdir={tmp_path / 'run'}", "--jax_cache_dir=",
               f"--config.data.tfds_data_dir={mount / 'tfds'}"]
        done = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True,
                              timeout=300)
        left = [p.name for p in mount.rglob("*")
                if p.name.startswith("incomplete.") or p.name.endswith((".partial", ".unsorted"))]
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"unet_jax\.main: error: {re.escape(str(mount))}/tfds\S*: cannot prepare "
                        r"synthetic there: No space left on device", last), last
    assert "Traceback" not in done.stderr and not left, left
    assert not (tmp_path / "run").exists()


def test_a_savedmodel_on_a_full_disk_is_one_line_and_leaves_no_partial_folder(tmp_path):
    """export.save_module: TensorFlow's write error (not an OSError) becomes one InputError
    naming --output; its temporary sibling folder is removed."""
    import tensorflow as tf

    from unet_jax.cli import export
    from unet_jax.errors import InputError

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.zeros([256, 256]))  # 256 KiB: more than the disk holds

        @tf.function(input_signature=[tf.TensorSpec([2], tf.float32)])
        def serve(self, x):
            return {"y": x + self.w[0, :2]}

    with small_disk(tmp_path) as mount:
        with pytest.raises(InputError) as err:
            export.save_module(Module(), mount / "saved", {})
        left = sorted(p.name for p in mount.iterdir())
    assert str(err.value) == f"{mount / 'saved'}: cannot write the SavedModel: " \
                             "No space left on device", str(err.value)
    assert left == [], left


def test_orbax_log_records_lose_their_tracebacks_without_verbose():
    """A failed background write is logged by orbax with its traceback before the CLI's one-line
    error; the CLI's filter keeps orbax's message and drops the traceback (others untouched)."""
    import logging

    from unet_jax.cli.common import _without_library_tracebacks

    try:
        raise OSError(28, "No space left on device")
    except OSError:
        exc_info = sys.exc_info()
    records = [logging.LogRecord("absl", logging.ERROR, path, 1, "write failed", None, exc_info)
               for path in (f"{os.sep}x{os.sep}orbax{os.sep}checkpoint{os.sep}future.py",
                            f"{os.sep}x{os.sep}unet_jax{os.sep}train.py")]
    assert all(_without_library_tracebacks(r) for r in records)  # every record is kept
    formatter = logging.Formatter()
    assert formatter.format(records[0]) == "write failed"
    assert "Traceback" in formatter.format(records[1])


def test_a_damaged_checkpoint_is_reported_without_library_noise():
    """What the CLIs print for a damaged checkpoint: tensorstore's kilobyte-long driver spec is
    cut from the one-line message, and the dozens of "Event loop is closed" reports that
    tensorstore's late callbacks raise after orbax gives up are dropped (other unraisable
    exceptions still reach the default hook)."""
    from types import SimpleNamespace

    from unet_jax.cli.common import _without_closed_loop_reports
    from unet_jax.errors import one_line

    err = ValueError('NOT_FOUND: Error opening "zarr" driver: Metadata at "a/.zarray" does not '
                     "exist [tensorstore_spec='{\"context\":{\"cache_pool\":{}},\"driver\":\"zarr\"}']")
    assert one_line(err) == 'NOT_FOUND: Error opening "zarr" driver: Metadata at "a/.zarray" ' \
                            "does not exist"
    seen = []
    for exc in (RuntimeError("Event loop is closed"), RuntimeError("something else"),
                ValueError("Event loop is closed")):
        _without_closed_loop_reports(SimpleNamespace(exc_value=exc), seen.append)
    assert [str(u.exc_value) for u in seen] == ["something else", "Event loop is closed"]
    assert isinstance(seen[1].exc_value, ValueError)
