"""Input pipelines: training batches (unet_jax.data.sampler) are a pure function of (seed, step)
whatever the number of worker processes (resume, host sharding); eval (unet_jax.data.pipeline)."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from unet_jax.data import pipeline as P
from unet_jax.data import sampler as S
import mmseg_reference as T
from unet_jax.data import augment as A
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


def _ds(arrays: dict[str, np.ndarray]) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(arrays)


def _cfg() -> ml_collections.ConfigDict:
    return load_config("configs/drive.py").data


def _take(ds: tf.data.Dataset, cfg, n: int, **kwargs) -> list[dict[str, np.ndarray]]:
    """The first `n` training batches of `ds` (records cached from it), in step order."""
    batches = S.train_batches(P.cache_records(ds), cfg, **kwargs)
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
    shards = [full.take(3), full.skip(3)]  # what host_train_split gives each of 2 hosts
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
    assert P.host_train_split(0, 1) == "train"
    splits = [str(P.host_train_split(p, 2)) for p in range(2)]
    assert splits[0] != splits[1]


def test_samples_follow_epoch_permutations_and_reference(drive) -> None:
    sampler = S.TrainSampler(P.cache_records(_ds(drive)), _cfg(), seed=7)
    assert [r.name for r in sampler.records] == sorted(drive["name"])
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
    enc = {"image": np.array(encoded, dtype=object), "label": drive["label"],
           "name": drive["name"]}
    a = _take(_ds(drive), cfg, 2, global_batch_size=4, seed=0)
    b = _take(_ds(enc), cfg, 2, global_batch_size=4, seed=0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_eval_dataset(drive) -> None:
    cfg = _cfg()
    items = list(P.eval_dataset(_ds(drive), cfg, max_images=3))
    assert [e["name"] for e in items] == list(drive["name"][:3])
    for e, img, lab in zip(items, drive["image"], drive["label"]):
        np.testing.assert_array_equal(e["image"], img)
        np.testing.assert_array_equal(e["label"], lab)
        assert e["image_normalised"].dtype == np.float32
        np.testing.assert_array_equal(e["image_normalised"],
                                      A.normalise(img[:, :, ::-1], cfg.mean, cfg.std))
    assert len(list(P.eval_dataset(_ds(drive), cfg))) == 8
    small = ml_collections.ConfigDict(cfg.to_dict())
    small.img_scale = (292, 282)  # keep-ratio resize: 291 x 282, label stays at full size
    e = next(P.eval_dataset(_ds(drive), small, max_images=1))
    assert e["image_normalised"].shape == (291, 282, 3) and e["label"].shape == (584, 565)
    ref, _ = A.resize_keep_ratio(drive["image"][0][:, :, ::-1], None, (292, 282))
    np.testing.assert_array_equal(e["image_normalised"], A.normalise(ref, cfg.mean, cfg.std))


def test_fov_goes_to_evaluation_only() -> None:
    rng = np.random.default_rng(1)
    arrays = {"image": rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8),
              "label": (rng.random((3, 40, 48)) < 0.3).astype(np.uint8),
              "fov": (rng.random((3, 40, 48)) < 0.8).astype(np.uint8),
              "name": np.array(["a", "b", "c"])}
    cfg = ml_collections.ConfigDict(_cfg().to_dict())
    cfg.img_scale, cfg.crop_size = (48, 40), (32, 32)
    items = list(P.eval_dataset(_ds(arrays), cfg))
    for e, fov in zip(items, arrays["fov"]):
        assert e["fov"].dtype == np.uint8
        np.testing.assert_array_equal(e["fov"], fov)
    no_fov = {k: v for k, v in arrays.items() if k != "fov"}
    assert "fov" not in next(P.eval_dataset(_ds(no_fov), cfg))
    # training reads image, label and name only: the same batches with or without a fov
    assert [r.name for r in P.cache_records(_ds(arrays))] == ["a", "b", "c"]
    with_fov = _take(_ds(arrays), cfg, 2, global_batch_size=2, seed=3)
    without = _take(_ds(no_fov), cfg, 2, global_batch_size=2, seed=3)
    for x, y in zip(with_fov, without):
        assert set(x) == {"image", "label"}
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_variable_sized_generator_dataset() -> None:
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (90, 70), (64, 64)]

    def gen():
        for k, (h, w) in enumerate(sizes):
            yield {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                   "label": (rng.random((h, w)) < 0.4).astype(np.uint8), "name": f"im{k}"}

    spec = {"image": tf.TensorSpec((None, None, 3), tf.uint8),
            "label": tf.TensorSpec((None, None), tf.uint8), "name": tf.TensorSpec((), tf.string)}
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    cfg = ml_collections.ConfigDict(_cfg().to_dict())
    cfg.img_scale = (64, 64)
    batch = _take(ds, cfg, 3, global_batch_size=3, seed=0)[-1]
    assert batch["image"].shape == (3, 64, 64, 3)
    assert [e["image"].shape[:2] for e in P.eval_dataset(ds, cfg)] == sizes


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


ORPHAN = """
import multiprocessing, os, signal, sys
from unet_jax.config import load_config
from unet_jax.data.folders import drive_records
from unet_jax.data.sampler import train_batches
if __name__ == "__main__":
    batches = train_batches(drive_records(sys.argv[1]), load_config("configs/drive.py").data,
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


def test_workers_exit_when_the_training_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no augmentation worker behind (holding shared memory and the parent's
    stdout: a caller waiting on that pipe would wait forever)."""
    import subprocess
    import sys
    import time
    from conftest import DATA, REPO, require_shared

    drive = require_shared(DATA / "DRIVE")
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    proc = subprocess.Popen([sys.executable, str(script), str(drive)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    proc.wait(timeout=120)
    proc.stdout.close()
    assert proc.returncode == -9 and len(pids) == 2, (proc.returncode, pids)
    deadline = time.monotonic() + 20
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if _running(p)]
    for p in alive:
        os.kill(p, 9)
    assert not alive, f"workers {alive} outlived the killed training process"


@pytest.mark.timeout(150)
def test_closing_with_batches_in_flight_never_hangs(drive) -> None:
    """Closing the generator while workers are writing prefetched batches ends promptly (with
    Pool.terminate alone, a worker killed mid-write kept the result lock: about 1 close in 20
    hung, so 24 closes catch it three times in four)."""
    records = P.cache_records(_ds(drive))
    for _ in range(24):
        batches = S.train_batches(records, _cfg(), global_batch_size=4, seed=0, workers=2,
                                  prefetch=4)
        next(batches)
        batches.close()
