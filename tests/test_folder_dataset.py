"""A folder of images and label files as a dataset (`configs/folder.py`, `unet_jax.data.folder`):
grey 0/255, colour-coded and palette-index labels, ignore pixels, val_stems, every broken case
listed at once, the command line's one-line error, the tools on it, and real DRIVE written as a
folder set against the DRIVE builder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unet_jax.data as D
from conftest import DATA, FIXTURES, REPO, require_shared, tiny_config
from unet_jax.config import check_config
from unet_jax.data import folder as F
from unet_jax.errors import ConfigError, DataProblems

COLOURS = ((0, 0, 0), (200, 30, 30), (30, 200, 30))


def rgb_image(rng: np.random.Generator, h: int = 24, w: int = 32) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def classes_map(rng: np.random.Generator, k: int, h: int = 24, w: int = 32) -> np.ndarray:
    return rng.integers(0, k, (h, w)).astype(np.uint8)


def write_set(root: Path, labels: dict[str, dict[str, Image.Image]], seed: int = 0,
              size: tuple[int, int] = (24, 32)) -> dict[str, dict[str, np.ndarray]]:
    """images/<split>/<stem>.png (random RGB) and labels/<split>/<stem>.png (given); returns
    the images by split and stem."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, np.ndarray]] = {}
    for split, files in labels.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem, label in files.items():
            image = rgb_image(rng, *size)
            Image.fromarray(image).save(root / "images" / split / f"{stem}.png")
            label.save(root / "labels" / split / f"{stem}.png")
            written.setdefault(split, {})[stem] = image
    return written


def config_for(root: Path, tmp_path: Path, **fields):
    """The checked folder config (tiny widths) of `root`, records under tmp_path/tfds."""
    overrides = {"data.root": str(root), "data.tfds_data_dir": str(tmp_path / "tfds"),
                 "data.workers": 0}
    overrides.update({k.replace("__", "."): v for k, v in fields.items()})
    return check_config(tiny_config("configs/folder.py:fcn,ce", overrides))


def read_split(config, split: str) -> dict[str, dict]:
    return {s["name"]: s for s in D.source(config.data, split)}


# ------------------------------------------------------------------------------ good sets
def test_grey_0_255_labels(tmp_path):
    rng = np.random.default_rng(1)
    truth = {split: {f"{split[0]}{i}": classes_map(rng, 2) for i in range(n)}
             for split, n in (("train", 3), ("val", 2))}
    images = write_set(tmp_path / "set", {split: {s: Image.fromarray(m * 255) for s, m in
                                                  files.items()} for split, files in truth.items()})
    config = config_for(tmp_path / "set", tmp_path, data__label_values=(0, 255),
                        data__classes=("background", "cell"))
    assert config.model.num_classes == 2 and config.data.image_size == (24, 32)
    assert config.data.crop_size == (16, 16) and config.eval.stride == (10, 10)
    for split, key in (("train", "train"), ("validation", "val")):
        got = read_split(config, split)
        assert sorted(got) == sorted(truth[key])
        for stem, sample in got.items():
            np.testing.assert_array_equal(sample["label"], truth[key][stem])
            np.testing.assert_array_equal(sample["image"], images[key][stem])
            assert "fov" not in sample


def test_colour_coded_three_classes_with_ignore(tmp_path):
    rng = np.random.default_rng(2)
    palette = np.array(COLOURS + ((255, 255, 255),), np.uint8)  # white: the ignore value
    truth = {split: {f"x{i}": rng.integers(0, 4, (24, 32)) for i in range(2)}
             for split in ("train", "val")}
    write_set(tmp_path / "set", {split: {s: Image.fromarray(palette[m]) for s, m in
                                         files.items()} for split, files in truth.items()})
    config = config_for(tmp_path / "set", tmp_path, data__label_values=COLOURS,
                        data__classes=("bg", "red", "green"))
    assert config.model.num_classes == 3 and config.data.palette == COLOURS
    for split, key in (("train", "train"), ("validation", "val")):
        for stem, sample in read_split(config, split).items():
            want = np.where(truth[key][stem] == 3, 255, truth[key][stem])
            np.testing.assert_array_equal(sample["label"], want)
    assert (read_split(config, "train")["x0"]["label"] == 255).any()


def test_palette_index_pngs_read_as_indices(tmp_path):
    """A palette PNG's pixels are its indices (cv2 would give its colours)."""
    rng = np.random.default_rng(3)
    truth = {split: {"p0": classes_map(rng, 3)} for split in ("train", "val")}
    palette = [0, 0, 0, 250, 10, 10, 10, 250, 10] + [0] * (256 * 3 - 9)

    def png(indices):
        img = Image.fromarray(indices, mode="P")
        img.putpalette(palette)
        return img
    write_set(tmp_path / "set", {split: {s: png(m) for s, m in files.items()}
                                 for split, files in truth.items()})
    config = config_for(tmp_path / "set", tmp_path, data__classes=("a", "b", "c"))
    assert config.data.label_values == (0, 1, 2)
    np.testing.assert_array_equal(read_split(config, "validation")["p0"]["label"],
                                  truth["val"]["p0"])


def test_val_stems_take_validation_from_the_training_folders(tmp_path):
    rng = np.random.default_rng(4)
    truth = {f"{i}": classes_map(rng, 2) for i in range(5)}
    write_set(tmp_path / "set", {"train": {s: Image.fromarray(m) for s, m in truth.items()}})
    config = config_for(tmp_path / "set", tmp_path, data__val_stems="3,4")
    assert sorted(read_split(config, "train")) == ["0", "1", "2"]
    assert sorted(read_split(config, "validation")) == ["3", "4"]


def test_derived_defaults_and_config_checks(tmp_path):
    assert F.default_crop((512, 512)) == 256 and F.default_crop((584, 565)) == 256
    assert F.default_crop((40, 100)) == 32 and F.default_crop((10, 10)) == 16
    with pytest.raises(ConfigError, match="data.label_values"):
        config_for(tmp_path, tmp_path, data__label_values=(0, 0))
    with pytest.raises(ConfigError, match="data.fov_labels"):
        config_for(tmp_path, tmp_path, data__classes=("a", "b", "c"), data__fov_labels="fov")


def test_sample_weights_reach_the_loss_per_record(tmp_path):
    """data.sample_weights: every batch row carries its record's weight (1 where the file is
    silent), and the training step's loss is mmseg's weighted one: with every weight 2 it is
    twice the unweighted loss (the mean of weighted pixel losses, avg_non_ignore off)."""
    import jax
    from unet_jax.data.sampler import BatchPlan, aug_config
    from unet_jax.losses import segmentation_loss

    rng = np.random.default_rng(6)
    write_set(tmp_path / "set", {"train": {f"s{i}": Image.fromarray(classes_map(rng, 2))
                                           for i in range(3)},
                                 "val": {"v0": Image.fromarray(classes_map(rng, 2))}})
    (tmp_path / "set" / "weights.csv").write_text("# stem,weight\ns0, 0.5\n\ns2,3\n")
    config = config_for(tmp_path / "set", tmp_path, data__sample_weights="weights.csv")
    train = D.source(config.data, "train")
    weights = F.sample_weights(config.data, train.names())
    assert dict(zip(train.names(), weights.tolist())) == {"s0": 0.5, "s1": 1.0, "s2": 3.0}
    plan = BatchPlan(aug_config(config.data), 0, 4, 0, 1, False, tuple(weights))
    sampler = plan.sampler(train)
    batch = plan.make(sampler, 1)
    rows = [sampler.image_index(i) for i in range(4, 8)]
    np.testing.assert_array_equal(batch["sample_weight"], weights[rows])
    assert F.sample_weights(tiny_config().data, train.names()) is None

    logits = jax.random.normal(jax.random.key(0), (*batch["label"].shape, 2))
    plain, _ = segmentation_loss(logits, None, batch["label"], config.loss)
    doubled, _ = segmentation_loss(logits, None, batch["label"], config.loss,
                                   sample_weight=np.full(4, 2.0, np.float32))
    np.testing.assert_allclose(doubled, 2 * plain, rtol=1e-6)


def test_a_broken_sample_weights_file_is_listed_with_the_other_problems(tmp_path):
    rng = np.random.default_rng(7)
    write_set(tmp_path / "set", {"train": {f"s{i}": Image.fromarray(classes_map(rng, 2))
                                           for i in range(2)},
                                 "val": {"v0": Image.fromarray(classes_map(rng, 2))}})
    weights = tmp_path / "set" / "w.txt"
    weights.write_text("s0,1\ns0,2\nv0,1\ns1,-1\nnope\n")
    with pytest.raises(DataProblems) as caught:
        D.prepare(config_for(tmp_path / "set", tmp_path, data__sample_weights="w.txt").data)
    assert list(caught.value.problems) == [
        f"{weights}:2: 's0' is listed twice",
        f"{weights}:3: 'v0' is no image of the training split",
        f"{weights}:4: expected 'stem,weight' with a finite weight >= 0, found 's1,-1'",
        f"{weights}:5: expected 'stem,weight' with a finite weight >= 0, found 'nope'"]
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record"))


# ------------------------------------------------------------------------------ broken sets
def test_every_problem_is_listed_and_nothing_is_written(tmp_path):
    rng = np.random.default_rng(5)
    grey = {f"g{i}": Image.fromarray(classes_map(rng, 2) * 255) for i in range(6)}
    root = tmp_path / "set"
    write_set(root, {"train": grey})
    (root / "images" / "val").mkdir(parents=True)          # an empty validation split
    (root / "labels" / "val").mkdir(parents=True)
    lab, img = root / "labels" / "train", root / "images" / "train"
    (lab / "g0.png").unlink()                               # image without a label
    Image.fromarray(rgb_image(rng)).save(img / "g1.jpg")   # a second file with stem g1
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(lab / "g2.png")  # size mismatch
    bad = classes_map(rng, 2) * 255
    bad[0, :3] = 128
    Image.fromarray(bad).save(lab / "g3.png")               # a value that is no class
    (img / "g4.png").write_bytes(b"not an image")           # an unreadable image
    Image.fromarray(classes_map(rng, 2)).save(lab / "orphan.png")  # label without an image
    config = tiny_config("configs/folder.py:fcn,ce", {
        "data.root": str(root), "data.tfds_data_dir": str(tmp_path / "tfds"),
        "data.label_values": (0, 255), "data.image_size": (24, 32), "data.img_scale": (24, 32),
        "data.crop_size": (16, 16)})
    check_config(config)
    with pytest.raises(DataProblems) as caught:
        D.prepare(config.data)
    problems = caught.value.problems
    expected = [("g0.png", "image without a label"), ("g1.png", "duplicate stem 'g1'"),
                ("g2.png", "is 32x20 (WxH)"), ("g3.png", "label value 128"),
                ("g4.png", "cannot read"), ("orphan.png", "label without an image"),
                ("images/val", "validation split is empty")]
    for name, what in expected:
        assert any(name in p and what in p for p in problems), (name, what, problems)
    assert len(problems) == len(expected), problems
    assert not any((tmp_path / "tfds").rglob("*.array_record"))


def test_cli_reports_a_missing_label_in_one_line(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "set"
    write_set(root, {split: {"a": Image.fromarray(classes_map(rng, 2))}
                     for split in ("train", "val")})
    (root / "labels" / "val" / "a.png").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "unet_jax.browse", "--config", "configs/folder.py",
         f"--config.data.root={root}", f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
         f"--output={tmp_path / 'browse'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"unet_jax.browse: error: {root / 'images' / 'val' / 'a.png'}: image "
                     "without a label (expected a.png among the validation labels)"], lines


# ------------------------------------------------------------------------------ the tools
def test_browse_benchmark_input_and_segmenter_on_a_colour_set(tmp_path):
    from unet_jax.cli.benchmark import measure_input
    from unet_jax.cli.browse import browse
    from unet_jax.segmenter import Segmenter

    rng = np.random.default_rng(7)
    palette = np.array(COLOURS, np.uint8)
    labels = {split: {f"c{i}": Image.fromarray(palette[classes_map(rng, 3, 32, 32)])
                      for i in range(2)} for split in ("train", "val")}
    write_set(tmp_path / "set", labels, size=(32, 32))
    config = config_for(tmp_path / "set", tmp_path, data__label_values=COLOURS,
                        data__classes=("bg", "red", "green"), train__batch_size=2)
    written = browse(config, tmp_path / "browse", num=2, progress=False)
    assert len(written["train"]) == 2 and len(written["validation"]) == 2
    assert measure_input(config, workers=0, steps=2)["crops_per_s"] > 0
    from unet_jax.io import weights
    from unet_jax.models import build_model
    model = build_model(config.model)
    weights.save(tmp_path / "weights", model, {"model": config.model.to_dict()})
    seg = Segmenter.load(config, tmp_path / "weights")
    labels, scores = seg.predict(rgb_image(rng, 32, 32))
    assert labels.shape == (32, 32) and scores.shape == (32, 32, 3)
    assert seg.palette == [list(c) for c in COLOURS]


# ------------------------------------------------------------------------------ real DRIVE
@pytest.fixture(scope="module")
def drive_as_folder(tmp_path_factory):
    """(the DRIVE builder's data dict, the folder config of DRIVE written as PNG images, 0/255
    PNG labels and 0/255 FOV masks from the builder's records)."""
    manual = require_shared(DATA / "DRIVE")
    tmp = tmp_path_factory.mktemp("drive_folder")
    builder = dict(name="drive", manual_dir=str(manual), tfds_data_dir=str(tmp / "tfds"))
    root = tmp / "set"
    for split, sub in (("train", "train"), ("validation", "val")):
        for folder in ("images", "labels", "fov"):
            (root / folder / sub).mkdir(parents=True)
        for sample in D.source(builder, split):
            name = sample["name"]
            Image.fromarray(sample["image"]).save(root / "images" / sub / f"{name}.png")
            Image.fromarray(sample["label"] * 255).save(root / "labels" / sub / f"{name}.png")
            Image.fromarray(sample["fov"] * 255).save(root / "fov" / sub / f"{name}.png")
    for sub in ("train", "val"):  # one FOV folder for both splits (DRIVE's stems are unique)
        for path in (root / "fov" / sub).iterdir():
            path.rename(root / "fov" / path.name)
        (root / "fov" / sub).rmdir()
    model = {"model.base_channels": 8, "model.head_channels": 8, "eval.max_images": 2,
             "init_from": str(require_shared(FIXTURES / "models" / "fcn_drive.pth"))}
    config = tiny_config("configs/folder.py:fcn,ce", {
        **model, "data.root": str(root), "data.tfds_data_dir": str(tmp / "tfds"),
        "data.label_values": (0, 255), "data.classes": ("background", "vessel"),
        "data.palette": ((120, 120, 120), (6, 230, 230)), "data.fov_labels": "fov",
        "data.image_size": (584, 565), "data.img_scale": (584, 565), "data.crop_size": (64, 64),
        "eval.crop_size": (64, 64), "eval.stride": (42, 42)})
    drive = tiny_config("configs/drive.py:fcn,ce", {
        **model, "data.manual_dir": str(manual), "data.tfds_data_dir": str(tmp / "tfds")})
    return drive, check_config(config)


def test_drive_as_a_folder_set_equals_the_builder(drive_as_folder):
    drive, config = drive_as_folder
    for split in ("train", "validation"):
        want, got = D.source(drive.data, split), D.source(config.data, split)
        assert got.names() == want.names()
        for a, b in zip(want, got):
            assert set(a) == set(b) == {"image", "label", "fov", "name"}
            for key in ("image", "label", "fov"):
                np.testing.assert_array_equal(a[key], b[key])


def test_drive_as_a_folder_set_evaluates_to_the_builders_metrics(drive_as_folder):
    """`--mode eval` of one checkpoint (mmseg's fixture weights; slide 64/42, 2 images)."""
    from unet_jax.train import evaluate_checkpoint
    drive, config = drive_as_folder
    want = evaluate_checkpoint(check_config(drive), None)
    got = evaluate_checkpoint(config, None)
    assert "fov" in want and got == want
