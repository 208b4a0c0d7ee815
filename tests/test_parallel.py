"""Data parallelism: 1 device vs 4 devices vs 2 processes x 2 devices give the same training
and the same evaluation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import REPO, RUN_MAIN, TINY, free_port, read_metrics, run_cli, run_together

FLAGS = ("--config.train.num_steps=3", "--config.train.batch_size=4",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.train.checkpoint_every=0")
TERMS = ("loss", "decode.loss_ce", "aux.loss_ce", "lr")
# Validation by slide inference (crop 32, stride 21 on 64 x 64: 9 windows per image), one
# window per device per step whatever the layout: batch_windows = the devices per process.
SLIDE = ("--config.eval.mode=slide",)


def _windows(devices: int) -> str:
    return f"--config.eval.batch_windows={devices}"


def _devices_env(env: dict[str, str], count: int) -> dict[str, str]:
    env = dict(env)
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={count}"
    return env


def _train_lines(workdir: Path) -> list[dict]:
    return [r for r in read_metrics(workdir) if r["split"] == "train"]


def _assert_same_training(a: Path, b: Path) -> None:
    lines_a, lines_b = _train_lines(a), _train_lines(b)
    assert [r["step"] for r in lines_a] == [r["step"] for r in lines_b] == [1, 2, 3]
    for ra, rb in zip(lines_a, lines_b):
        for key in TERMS:
            assert rb[key] == pytest.approx(ra[key], rel=2e-5, abs=1e-6), (ra["step"], key)
    va = [r for r in read_metrics(a) if r["split"] == "validation"][-1]
    vb = [r for r in read_metrics(b) if r["split"] == "validation"][-1]
    assert vb["aAcc"] == pytest.approx(va["aAcc"], abs=0.02)


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory, run_env) -> Path:
    workdir = tmp_path_factory.mktemp("par") / "four"
    done = run_cli(_devices_env(run_env, 4), workdir, *FLAGS, *SLIDE, _windows(4))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_four_devices_match_one(tmp_path, train_config, four_device_run):
    from unet_jax.train import train_and_evaluate

    assert jax.device_count() == 1  # this process: the one-device reference
    one = tmp_path / "one"
    config = train_config(num_steps=3, batch_size=4, log_every=1, eval_every=0,
                          checkpoint_every=0)
    config.eval.mode, config.eval.batch_windows = "slide", 1
    train_and_evaluate(config, one)
    _assert_same_training(one, four_device_run)


def _two_processes(env: dict[str, str], workdir: Path, *flags: str) -> list[str]:
    """Run the CLI as 2 processes x 2 devices; their stdouts (asserts both succeed)."""
    env = _devices_env(env, 2)
    address = f"127.0.0.1:{free_port()}"
    return run_together([([sys.executable, str(RUN_MAIN), f"--config={TINY}",
                           f"--workdir={workdir}", "--jax_cache_dir=",
                           f"--coordinator_address={address}", "--num_processes=2",
                           f"--process_id={pid}", *flags], env, REPO) for pid in range(2)])


def _validation(workdir: Path) -> dict:
    """The last validation record of `workdir` without its mode (train or eval)."""
    line = [r for r in read_metrics(workdir) if r["split"] == "validation"][-1]
    return {k: v for k, v in line.items() if k != "mode"}


def _one_device_evaluation(train_config, checkpointed: Path, workdir: Path) -> dict:
    """`checkpointed`'s latest checkpoint evaluated in this process, on its one device."""
    from unet_jax.train import evaluate_checkpoint

    assert jax.device_count() == 1
    config = train_config()
    config.eval.mode, config.eval.batch_windows = "slide", 1
    config.init_from = str(checkpointed)
    evaluate_checkpoint(config, workdir)
    return _validation(workdir)


# Evaluation is exact across layouts: each device runs one window per step in every layout, so
# every logit is the same float computation, summed into the canvas in the same order, and the
# counts are integers (summed over the processes, each of which takes every other image). So a
# run's final validation on 4 devices, or on 2 processes x 2 devices, equals the evaluation of
# its checkpoint on 1 device, exactly.
def test_two_processes_match_one_process(tmp_path, run_env, train_config, four_device_run):
    workdir = tmp_path / "multi"
    outputs = _two_processes(run_env, workdir, *FLAGS, *SLIDE, _windows(2))
    assert "4 cpu device(s) in 2 process(es), global batch 4 (2 per process)" in outputs[0]
    _assert_same_training(four_device_run, workdir)
    assert (workdir / "checkpoints" / "3" / "model").is_dir()
    multi = _validation(workdir)
    assert multi["step"] == 3
    assert _one_device_evaluation(train_config, workdir, tmp_path / "one") == multi


def test_four_device_evaluation_equals_one_device(tmp_path, train_config, four_device_run):
    four = _validation(four_device_run)
    assert four["step"] == 3
    assert _one_device_evaluation(train_config, four_device_run, tmp_path / "one") == four


SHARDED_INIT = """
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from unet_jax.config import load_config
from unet_jax.models import build_model
cfg = load_config("configs/drive.py:deeplabv3").model
cfg.base_channels = 8
mesh = jax.make_mesh((4,), ("data",))
init = lambda: nnx.state(build_model(cfg, seed=7))
abstract = jax.eval_shape(init)
# Conv kernels split over their output channels where they divide, the rest replicated.
spec = lambda x: P(None, None, None, "data") if x.ndim == 4 and x.shape[-1] % 4 == 0 else P()
shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), abstract)
sharded = jax.jit(init, out_shardings=shardings)()
eager = init()
pairs = list(zip(jax.tree.leaves(eager), jax.tree.leaves(sharded)))
split = sum(len(b.sharding.device_set) == 4 and not b.sharding.is_fully_replicated
            for _, b in pairs)
same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
print(f"leaves {len(pairs)} split {split} same {same}")
"""


def test_sharded_initialisation_equals_eager(run_env):
    done = subprocess.run([sys.executable, "-c", SHARDED_INIT], cwd=REPO,
                          env=_devices_env(run_env, 4), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    leaves, split, same = done.stdout.split()[1::2]
    assert int(split) > 20 and same == "True", done.stdout


def test_mesh_and_global_batch_in_process():
    from unet_jax import parallel
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    n = jax.device_count()
    batch = parallel.global_batch({"image": np.ones((2 * n, 4, 4, 3), np.float32)}, mesh)
    assert batch["image"].shape == (2 * n, 4, 4, 3)
    assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    from unet_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="train.batch_size"):
        parallel.check_batch_size(0, mesh)
    tree = parallel.replicate({"w": np.arange(3.0)}, mesh)
    assert tree["w"].sharding.is_fully_replicated
    np.testing.assert_array_equal(parallel.to_host(tree)["w"], np.arange(3.0))


def test_multihost_detection(monkeypatch):
    from unet_jax import parallel
    for name in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_JOB_ID", "SLURM_NTASKS",
                 "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.detect_multihost_env() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert parallel.detect_multihost_env() is None  # a single task is not multi-host
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.detect_multihost_env() == "SLURM"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2")
    assert parallel.detect_multihost_env() == "TPU pod"
    with pytest.raises(ValueError, match="--num_processes"):
        parallel.initialize("127.0.0.1:1234", None, 0)
    assert not os.environ.get("JAX_COORDINATOR_ADDRESS")
