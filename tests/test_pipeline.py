"""Input pipelines: the prepared records (unet_jax.data.records) give back what was written;
training batches (unet_jax.data.sampler, grain) are a pure function of (seed, step) whatever the
number of worker processes (resume, host sharding, a worker killed); evaluation samples."""
from __future__ import annotations

import os
from pathlib import Path

import itertools

import cv2
import ml_collections
import numpy as np
import pytest
from PIL import Image

from unet_jax.data import records as R
from unet_jax.data import sampler as S
import mmseg_reference as T
from unet_jax.config import load_config


def drive_arrays(data_dir: Path, count: int = 20) -> dict[str, np.ndarray]:
    """DRIVE training images (RGB) and labels (gif // 128), read directly with Pillow."""
    root = data_dir / "DRIVE" / "training"
    names = sorted(p.name.split("_")[0] for p in (root / "images").glob("*_training.tif"))[:count]
    assert len(names) == count, f"expected {count} DRIVE training images, found {len(names)}"
    images = [np.asarray(Image.open(root / "images" / f"{n}_training.tif").convert("RGB"))
              for n in names]
    labels = [(np.asarray(Image.open(root / "1st_manual" / f"{n}_manual1.gif")) // 128)
              .astype(np.uint8) for n in names]
    return {"image": np.stack(images), "label": np.stack(labels), "name": np.array(names)}


@pytest.fixture
def drive(data_dir: Path) -> dict[str, np.ndarray]:
    return drive_arrays(data_dir, 8)


_COUNTER = itertools.count()


def _examples(arrays: dict[str, np.ndarray]) -> list[dict]:
    keys = list(arrays)
    return [dict(zip(keys, values)) for values in zip(*(arrays[k] for k in keys))]


def _ds(arrays: dict[str, np.ndarray] | list[dict], tmp: Path | None = None) -> R.RecordSource:
    """Records written from `arrays` (columns) or a list of examples, opened as a source."""
    import tempfile
    folder = Path(tmp or tempfile.mkdtemp(prefix="records-"))
    path = R.split_path(folder, f"split{next(_COUNTER)}")
    examples = arrays if isinstance(arrays, list) else _examples(arrays)
    R.write_split(examples, path)
    return R.RecordSource(path)


def _cfg() -> ml_collections.ConfigDict:
    return load_config("configs/drive.py").data


def _take(ds: R.RecordSource, cfg, n: int, **kwargs) -> list[dict[str, np.ndarray]]:
    """The first `n` training batches of `ds`, in step order."""
    batches = S.train_batches(ds, cfg, **kwargs)
    try:
        return [next(batches) for _ in range(n)]
    finally:
        batches.close()


def test_shapes_and_values(drive) -> None:
    batch = _take(_ds(drive), _cfg(), 1, global_batch_size=8, seed=0)[0]
    assert batch["image"].shape == (8, 64, 64, 3) and batch["label"].shape == (8, 64, 64)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= {0, 1}
    lo = (0 - np.array(_cfg().mean)) / np.array(_cfg().std)
    hi = (255 - np.array(_cfg().mean)) / np.array(_cfg().std)
    assert (batch["image"] >= lo - 1e-5).all() and (batch["image"] <= hi + 1e-5).all()


def test_deterministic_and_resumable(drive) -> None:
    cfg = _cfg()
    a = _take(_ds(drive), cfg, 4, global_batch_size=4, seed=3)
    b = _take(_ds(drive), cfg, 4, global_batch_size=4, seed=3)
    resumed = _take(_ds(drive), cfg, 2, global_batch_size=4, seed=3,
                                    start_step=2)
    other = _take(_ds(drive), cfg, 1, global_batch_size=4, seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    for x, y in zip(a[2:], resumed):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], other[0]["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_host_sharding_concatenates_to_global_batch(drive) -> None:
    cfg = _cfg()
    whole = _take(_ds(drive), cfg, 2, global_batch_size=6, seed=1, start_step=5)
    hosts = [_take(_ds(drive), cfg, 2, global_batch_size=6, seed=1, start_step=5,
                                   process_index=p, process_count=2) for p in range(2)]
    for step in range(2):
        for key in ("image", "label"):
            joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
            assert hosts[0][step][key].shape[0] == 3
            np.testing.assert_array_equal(joined, whole[step][key])
    with pytest.raises(ValueError, match="multiple of process_count=4"):
        _take(_ds(drive), cfg, 1, global_batch_size=6, seed=1, process_count=4)


def test_host_shard_reads_only_the_hosts_images() -> None:
    """With host_shard each host draws only from its own shard, deterministically per step."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 80, 80, 3), dtype=np.uint8)
    labels = np.stack([np.full((80, 80), k // 3, np.uint8) for k in range(6)])
    names = np.array([f"im{k}" for k in range(6)])
    full = _ds({"image": images, "label": labels, "name": names})
    shards = [full.shard(R.host_rows(len(full), p, 2)) for p in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    cfg = _cfg()

    def run(p: int, start: int, n: int):
        return _take(shards[p], cfg, n, global_batch_size=8, seed=2, start_step=start,
                     process_index=p, process_count=2, host_shard=True)

    for p in range(2):
        batches = run(p, 0, 3)
        for b in batches:
            assert b["label"].shape == (4, 64, 64)
            assert set(np.unique(b["label"])) == {p}, f"host {p} used another host's image"
        for x, y in zip(batches[1:], run(p, 1, 2)):
            np.testing.assert_array_equal(x["image"], y["image"])
    assert [R.host_rows(10, p, 3) for p in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert R.host_rows(5, 0, 1) == range(5)


def test_samples_follow_epoch_permutations_and_reference(drive) -> None:
    sampler = S.TrainSampler(_ds(drive), _cfg(), seed=7)
    assert sampler.records.names() == sorted(drive["name"])
    for epoch in range(3):  # every image once per epoch
        seen = sorted(sampler.image_index(epoch * 8 + j) for j in range(8))
        assert seen == list(range(8))
    idx = S.step_indices(3, 6)
    images, labels = sampler.batch(idx)
    for k, i in enumerate(idx):  # the batch path equals the mmseg-structured reference
        image, label = sampler.pair(int(i))
        ref_img, ref_lab = T.train_sample(image, label, T.ParamDraws(sampler.params(int(i))),
                                          sampler.data_cfg)
        np.testing.assert_array_equal(images[k], ref_img)
        np.testing.assert_array_equal(labels[k], ref_lab)


def test_encoded_images_give_the_same_batches(drive) -> None:
    cfg = _cfg()
    encoded = [cv2.imencode(".png", img[:, :, ::-1])[1].tobytes() for img in drive["image"]]
    enc = [{"image": e, "label": lab, "name": n}
           for e, lab, n in zip(encoded, drive["label"], drive["name"])]
    a = _take(_ds(drive), cfg, 2, global_batch_size=4, seed=0)
    b = _take(_ds(enc), cfg, 2, global_batch_size=4, seed=0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_eval_samples(drive) -> None:
    """Evaluation samples are the written pixels: uint8 RGB image, label, name, in name order."""
    source = _ds(drive)
    items = list(R.samples(source, max_images=3))
    assert [e["name"] for e in items] == list(drive["name"][:3])
    for e, img, lab in zip(items, drive["image"], drive["label"]):
        assert set(e) == {"image", "label", "name"}
        assert e["image"].dtype == np.uint8 and e["label"].dtype == np.uint8
        np.testing.assert_array_equal(e["image"], img)
        np.testing.assert_array_equal(e["label"], lab)
    assert len(list(R.samples(source))) == len(source) == 8
    with pytest.raises(ValueError, match="max_images"):
        next(R.samples(source, -1))


def test_records_are_sorted_safe_and_refuse_what_is_not_there(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    examples = [{"image": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
                 "label": rng.integers(0, 2, (5, 7), dtype=np.uint8), "name": n}
                for n in ("b", "a", "c")]
    source = _ds(examples, tmp_path)
    assert source.names() == ["a", "b", "c"]
    np.testing.assert_array_equal(source[0]["image"], examples[1]["image"])
    assert source.shard(range(1, 3)).names() == ["b", "c"]
    with pytest.raises(IndexError):
        source[3]  # pylint: disable=pointless-statement
    with pytest.raises(R.DataError, match="no prepared records"):
        R.RecordSource(tmp_path / "absent.array_record")
    with pytest.raises(R.DataError, match="share a name"):
        R.write_split(examples + examples[:1], tmp_path / "dup.array_record")
    assert not (tmp_path / "dup.array_record").exists()
    assert not list(tmp_path.glob(".*")), "scratch files left behind"


def test_fov_goes_to_evaluation_only() -> None:
    rng = np.random.default_rng(1)
    arrays = {"image": rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8),
              "label": (rng.random((3, 40, 48)) < 0.3).astype(np.uint8),
              "fov": (rng.random((3, 40, 48)) < 0.8).astype(np.uint8),
              "name": np.array(["a", "b", "c"])}
    cfg = ml_collections.ConfigDict(_cfg().to_dict())
    cfg.img_scale, cfg.crop_size = (48, 40), (32, 32)
    items = list(R.samples(_ds(arrays)))
    for e, fov in zip(items, arrays["fov"]):
        assert e["fov"].dtype == np.uint8
        np.testing.assert_array_equal(e["fov"], fov)
    no_fov = {k: v for k, v in arrays.items() if k != "fov"}
    assert "fov" not in next(R.samples(_ds(no_fov)))
    # training reads image and label only: the same batches with or without a fov
    with_fov = _take(_ds(arrays), cfg, 2, global_batch_size=2, seed=3)
    without = _take(_ds(no_fov), cfg, 2, global_batch_size=2, seed=3)
    for x, y in zip(with_fov, without):
        assert set(x) == {"image", "label"}
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_variable_sized_images() -> None:
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (90, 70), (64, 64)]
    examples = [{"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                 "label": (rng.random((h, w)) < 0.4).astype(np.uint8), "name": f"im{k}"}
                for k, (h, w) in enumerate(sizes)]
    ds = _ds(examples)
    cfg = ml_collections.ConfigDict(_cfg().to_dict())
    cfg.img_scale = (64, 64)
    batch = _take(ds, cfg, 3, global_batch_size=3, seed=0)[-1]
    assert batch["image"].shape == (3, 64, 64, 3)
    assert [e["image"].shape[:2] for e in R.samples(ds)] == sizes


def test_worker_processes_give_the_same_bits(drive) -> None:
    """The batches are a function of (seed, step) only: 0 (in process), 1 or 2 workers, and a
    resume at step 3 with 2 workers, give identical bytes."""
    cfg = _cfg()
    runs = {w: _take(_ds(drive), cfg, 5, global_batch_size=4, seed=5, workers=w)
            for w in (0, 1, 2)}
    resumed = _take(_ds(drive), cfg, 2, global_batch_size=4, seed=5, start_step=3, workers=2)
    for w in (1, 2):
        for x, y in zip(runs[0], runs[w]):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["label"], y["label"])
    for x, y in zip(runs[0][3:], resumed):
        np.testing.assert_array_equal(x["image"], y["image"])


def _write_drive_records(drive: dict[str, np.ndarray], folder: Path) -> Path:
    path = R.split_path(folder, "train")
    R.write_split(_examples(drive), path)
    return path


ORPHAN = """
import multiprocessing, os, signal, sys
from unet_jax.config import load_config
from unet_jax.data.records import RecordSource
from unet_jax.data.sampler import train_batches
if __name__ == "__main__":
    batches = train_batches(RecordSource(sys.argv[1]), load_config("configs/drive.py").data,
                            global_batch_size=2, seed=0, workers=2)
    next(batches)
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no finally runs: the workers are on their own
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # an unreaped zombie has exited


def test_workers_exit_when_the_training_process_is_killed(drive, tmp_path: Path) -> None:
    """SIGKILL leaves no augmentation worker behind (holding the parent's stdout: a caller
    waiting on that pipe would wait forever)."""
    import subprocess
    import sys
    import time
    from conftest import REPO

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    proc = subprocess.Popen([sys.executable, str(script), str(_write_drive_records(drive, tmp_path))],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    proc.wait(timeout=120)
    proc.stdout.close()
    assert proc.returncode == -9 and len(pids) >= 2, (proc.returncode, pids)
    deadline = time.monotonic() + 20
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if _running(p)]
    for p in alive:
        os.kill(p, 9)
    assert not alive, f"workers {alive} outlived the killed training process"


def _new_worker(known: set[int]) -> int | None:
    """The pid of an augmentation worker started since `known` was taken (None if there is
    none yet), and `known` then holds every current child: a test must not signal a worker that
    another test left to the garbage collector, nor one of a pool already replaced."""
    import multiprocessing

    children = [p.pid for p in multiprocessing.active_children()]
    fresh = [pid for pid in children if pid not in known]
    known.update(children)
    return fresh[0] if fresh else None


def _children() -> set[int]:
    import multiprocessing

    return {p.pid for p in multiprocessing.active_children()}


@pytest.mark.timeout(240)
def test_a_killed_worker_is_replaced_and_the_batches_stay_the_same(drive, capfd) -> None:
    """A worker SIGKILLed early (after the first batch) and a worker of the replacement pool
    later (from the sixth batch on, once that pool runs: grain notices a death only when the
    dead worker's prefetched batches are used up): the run goes on with new workers each time
    and exactly the batches of an in-process run."""
    import signal

    cfg = _cfg()
    source = _ds(drive)
    expected = _take(source, cfg, 20, global_batch_size=2, seed=9)
    known = _children()
    batches = S.train_batches(source, cfg, global_batch_size=2, seed=9, workers=2, prefetch=1)
    got, killed = [], []
    try:
        for step in range(20):
            got.append(next(batches))
            if step == 0 or (len(killed) == 1 and step >= 5):
                pid = _new_worker(known)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(step)
    finally:
        batches.close()
    assert killed[0] == 0 and len(killed) == 2 and killed[1] <= 12, killed
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    err = capfd.readouterr().err
    assert err.count("warning: an augmentation worker died") == 2, err[-2000:]


def test_workers_that_keep_dying_stop_the_run_with_one_error(drive) -> None:
    import signal

    known = _children()
    batches = S.train_batches(_ds(drive), _cfg(), global_batch_size=2, seed=0, workers=1,
                              max_restarts=0)
    try:
        next(batches)
        pid = _new_worker(known)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(S.WorkerError, match="died.*after 0 replacement.*resumes from its last"):
            for _ in range(50):
                next(batches)
    finally:
        batches.close()


@pytest.mark.timeout(240)
def test_a_stuck_worker_is_replaced_and_the_batches_stay_the_same(drive, capfd) -> None:
    """A worker stopped with SIGSTOP (alive, making nothing) is killed after `stall_s` and
    replaced: the batches are those of an in-process run."""
    import signal

    cfg = _cfg()
    source = _ds(drive)
    expected = _take(source, cfg, 8, global_batch_size=2, seed=4)
    known = _children()
    batches = S.train_batches(source, cfg, global_batch_size=2, seed=4, workers=2, prefetch=1,
                              stall_s=3)
    got = []
    try:
        for step in range(8):
            got.append(next(batches))
            if step == 0:
                pid = _new_worker(known)
                assert pid is not None
                os.kill(pid, signal.SIGSTOP)
    finally:
        batches.close()
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    err = capfd.readouterr().err
    assert "made no batch in 3 s and was killed; new workers continue" in err, err[-2000:]


SIGINT = """
import os, signal, sys, time
from unet_jax.config import load_config
from unet_jax.data.records import RecordSource
from unet_jax.data.sampler import train_batches

received = []
if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):  # a trainer's own handling: finish, then stop
        signal.signal(sig, lambda number, _: received.append(number))
    batches = train_batches(RecordSource(sys.argv[1]), load_config("configs/drive.py").data,
                            global_batch_size=2, seed=0, workers=2)
    try:
        for step in range(int(sys.argv[2])):
            next(batches)  # the workers must still be there after the signal
            if step == 1 and sys.argv[3] != "normal":  # what Ctrl-C or a scheduler does:
                os.killpg(0, getattr(signal, sys.argv[3].upper()))  # the whole process group
                time.sleep(3)
    finally:
        batches.close()
    print("interrupted" if received else "", "closed", flush=True)
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["normal", "sigint", "sigterm"])
def test_a_run_ends_quietly_and_ctrl_c_reaches_only_the_trainer(drive, tmp_path: Path,
                                                                how: str) -> None:
    """No SharedMemory/BufferError or worker tracebacks at the end of a run, and after SIGINT
    or SIGTERM to the whole process group only the trainer sees it (no worker dies)."""
    import subprocess
    import sys
    from conftest import REPO

    script = tmp_path / "run.py"
    script.write_text(SIGINT)
    done = subprocess.run([sys.executable, str(script), str(_write_drive_records(drive, tmp_path)),
                           "6", how], cwd=REPO, capture_output=True, text=True, timeout=200,
                          start_new_session=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split()
    assert lines == (["closed"] if how == "normal" else ["interrupted", "closed"]), done.stdout
    for bad in ("Traceback", "Exception ignored", "BufferError", "KeyboardInterrupt", "leaked",
                "died"):
        assert bad not in done.stderr, done.stderr[-3000:]


@pytest.mark.timeout(150)
def test_closing_with_batches_in_flight_never_hangs(drive) -> None:
    """Closing the generator while workers are writing prefetched batches ends promptly."""
    source = _ds(drive)
    for _ in range(4):
        batches = S.train_batches(source, _cfg(), global_batch_size=4, seed=0, workers=2,
                                  prefetch=4)
        next(batches)
        batches.close()
