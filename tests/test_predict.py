"""predict: label PNGs, overlays, logits; safe outputs; mmseg's decoding; any aspect ratio;
unreadable files skipped; --save_logits parity with mmseg (and the Segmenter) on DRIVE 01_test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import DATA, FIXTURES, REPO, require_shared, tiny_config, check_argmax
from test_images import png_header
from unet_jax import Segmenter
from unet_jax.cli import convert, predict
from unet_jax.io import weights
from unet_jax.errors import CheckpointError, InputError
from unet_jax.io.images import read_rgb
from unet_jax.models import build_model
from unet_jax.preprocess import rescale_size

TINY = ["--config.model.base_channels=8", "--config.model.head_channels=8"]


def fcn_config():
    """The drive fcn config at the fixtures' tiny widths."""
    return tiny_config("configs/drive.py:fcn")


@pytest.fixture(scope="module")
def pth() -> Path:
    return require_shared(FIXTURES / "models" / "fcn_drive.pth")


@pytest.fixture(scope="module")
def segmenter(pth: Path) -> Segmenter:
    """One model for the module: the fcn_drive fixture at its tiny widths."""
    return Segmenter.load(fcn_config(), pth)


@pytest.fixture(scope="module")
def drive_01() -> Path:
    return require_shared(DATA / "DRIVE" / "test" / "images" / "01_test.tif")


def check_outputs(out: Path, stem: str, hw: tuple[int, int], with_logits: bool) -> np.ndarray:
    label_img = Image.open(out / f"{stem}.png")
    assert label_img.mode == "P" and label_img.info["Software"] == "unet_jax.predict"
    assert label_img.info["Description"] == f"label map of {stem}"
    assert label_img.getpalette()[:6] == [120, 120, 120, 6, 230, 230]
    label = np.asarray(label_img)
    assert label.shape == hw and set(np.unique(label)) <= {0, 1}
    overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
    assert overlay.shape == (*hw, 3) and overlay.dtype == np.uint8
    logits_path = out / f"{stem}_logits.npy"
    assert logits_path.exists() == with_logits
    if with_logits:
        logits = np.load(logits_path)
        assert logits.dtype == np.float32 and logits.shape == (*hw, 2)
        np.testing.assert_array_equal(logits.argmax(-1), label)
    return label


def test_predict_crop_and_odd_sizes(tmp_path: Path, segmenter: Segmenter, drive_01: Path):
    rgb = read_rgb(drive_01)
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(rgb[150:350, 10:190]).save(inputs / "crop.png")
    Image.fromarray(rgb[300:337, 200:253]).save(inputs / "sub" / "odd.jpg")  # 37 x 53
    (inputs / "notes.txt").write_text("not an image, skipped in folders")
    out = inputs / "pred"  # inside the input folder: not searched for inputs
    for _ in range(2):  # the rerun replaces its own outputs
        report = predict.predict_files(segmenter, [inputs], out, save_logits=True,
                                       progress=False)
        assert [r.input.name for r in report.written] == ["crop.png", "odd.jpg"]
        assert not report.failed
    crop = check_outputs(out, "crop", (200, 180), True)
    assert 0 < crop.mean() < 1  # both classes present (the tiny model is untrained)
    check_outputs(out, "odd", (37, 53), True)
    # without the test-pipeline resize: 37x53 < the 64x64 crop, windows padded to 48x64
    out2 = tmp_path / "out_noresize"
    predict.predict_files(segmenter, [inputs / "sub" / "odd.jpg"], out2, resize=False,
                          progress=False)
    check_outputs(out2, "odd", (37, 53), False)


def test_predict_any_aspect_ratio(tmp_path: Path, segmenter: Segmenter):
    assert rescale_size(1, 5000, (584, 565)) == (1, 584)  # mmcv: (0, 584), then cv2 fails
    assert rescale_size(5000, 1, (584, 565)) == (584, 1)
    line = np.random.default_rng(0).integers(0, 256, (1, 5000, 3), dtype=np.uint8)
    Image.fromarray(line).save(tmp_path / "row.png")
    Image.fromarray(line.transpose(1, 0, 2).copy()).save(tmp_path / "column.png")
    out = tmp_path / "out"
    report = predict.predict_files(segmenter, [tmp_path / "row.png", tmp_path / "column.png"],
                                   out, progress=False)
    assert len(report.written) == 2 and not report.failed
    check_outputs(out, "row", (1, 5000), False)
    check_outputs(out, "column", (5000, 1), False)


def test_predict_decodes_like_mmseg(tmp_path: Path, segmenter: Segmenter, drive_01: Path):
    """EXIF-rotated JPEG and 16-bit grey PNG: outputs are those of cv2's decode of the file."""
    rgb = read_rgb(drive_01)[100:164, 200:296]  # 64 x 96
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 8
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    grey16 = rgb[..., 1].astype(np.uint16) * 257 + 100
    cv2.imwrite(str(tmp_path / "grey16.png"), grey16)
    out = tmp_path / "out"
    predict.predict_files(segmenter, [tmp_path / "rotated.jpg", tmp_path / "grey16.png"], out,
                          progress=False)
    for stem, hw in (("rotated", (96, 64)), ("grey16", (64, 96))):
        path = next(tmp_path.glob(f"{stem}.*"))
        decoded = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert decoded.shape[:2] == hw
        label = check_outputs(out, stem, hw, False)
        np.testing.assert_array_equal(label, segmenter.predict(decoded)[0])
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png")).astype(np.float32)
        colours = np.asarray(segmenter.palette, np.float32)[label]
        np.testing.assert_allclose(overlay, np.rint(0.5 * decoded + 0.5 * colours), atol=0.51)


def test_predict_refuses_unsafe_outputs(tmp_path: Path):
    """Every refusal happens before anything is written (plan_outputs needs no model)."""
    folder = tmp_path / "images"
    (folder / "other").mkdir(parents=True)
    pixels = np.zeros((4, 4, 3), np.uint8)
    for name in ("a.png", "a_overlay.png", "b.jpg", "other/b.png"):
        Image.fromarray(pixels).save(folder / name)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def refused(inputs, output, match, **kw):
        with pytest.raises(InputError, match=match):
            predict.plan_outputs(inputs, output, **kw)

    # --output = the input folder: a.png would be replaced by its label map
    refused([folder / "a.png"], folder, r"images/a\.png \(an output of .*a\.png\) would "
            r"overwrite the input .*images/a\.png")
    # a.png's overlay and a_overlay.png's label map are the same file
    refused([folder / "a.png", folder / "a_overlay.png"], tmp_path / "out",
            r"inputs .*a\.png and .*a_overlay\.png would both write .*out/a_overlay\.png")
    # the same stem in two folders; names that differ only in case
    refused([folder / "b.jpg", folder / "other"], tmp_path / "out",
            r"inputs .*images/b\.jpg and .*other/b\.png would both write .*out/b\.png;")
    Image.fromarray(pixels).save(tmp_path / "B.png")
    refused([folder / "b.jpg", tmp_path / "B.png"], tmp_path / "out",
            r"inputs .*b\.jpg and .*B\.png would both write .*b\.png / .*B\.png")
    (tmp_path / "file").write_text("x")
    refused([folder / "b.jpg"], tmp_path / "file", "is an existing file")
    # an output path holding a file predict did not write, a link, a folder
    out = tmp_path / "out"
    assert not out.exists()  # not even the output folder was created
    out.mkdir()
    (out / "b.png").write_bytes(b"someone's picture")
    refused([folder / "b.jpg"], out, r"out/b\.png \(an output of .*b\.jpg\) exists and was not "
            "written by unet_jax.predict")
    (out / "b.png").unlink()
    (out / "b.png").symlink_to(tmp_path / "elsewhere.png")
    refused([folder / "b.jpg"], out, "is a symbolic link")
    (out / "b.png").unlink()
    os.link(folder / "a.png", out / "b.png")  # a hard link to an input
    refused([folder / "b.jpg", folder / "a.png"], out, r"would overwrite the input .*a\.png")
    (out / "b.png").unlink()
    (out / "b_logits.npy").mkdir()
    refused([folder / "b.jpg"], out, "exists and is not a file", save_logits=True)
    (out / "b_logits.npy").rmdir()
    np.save(out / "b_logits.npy", np.zeros((4, 4), np.float32))  # not H x W x C
    refused([folder / "b.jpg"], out, r"b_logits\.npy .* not written", save_logits=True)
    np.save(out / "b_logits.npy", np.zeros((4, 4, 2), np.float32))  # a user's, of our shape
    refused([folder / "b.jpg"], out, r"b_logits\.npy .* not written", save_logits=True)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # earlier predict outputs of the same stems are replaced
    predict.save_logits(out / "b_logits.npy", np.zeros((4, 4, 2), np.float32))
    predict.save_label_png(out / "b.png", np.zeros((4, 4), np.uint8), [[0, 0, 0], [9, 9, 9]],
                           role="label map of b")
    plans = predict.plan_outputs([folder / "b.jpg"], out, save_logits=True)
    assert plans[0].paths() == [out / "b.png", out / "b_overlay.png", out / "b_logits.npy"]
    # ... but not predict outputs of another stem: b's overlay is not the label map of b_overlay
    predict.save_label_png(out / "b_overlay.png", np.zeros((4, 4), np.uint8), [[0, 0, 0]],
                           role="overlay of b")
    Image.fromarray(pixels).save(tmp_path / "b_overlay.jpg")
    refused([tmp_path / "b_overlay.jpg"], out, "not written by unet_jax.predict as the label map "
            "of b_overlay")


def test_a_full_disk_is_one_error_naming_the_file_and_leaves_no_partial_file(tmp_path: Path):
    """The logits of a 200 x 200 image (320 KB) do not fit a 64 KiB disk: one InputError naming
    the file and the OS error; the partial file is removed, the outputs written before stay."""
    from conftest import small_disk

    class Zeros:  # the writing is under test, not the model
        palette = [[0, 0, 0], [255, 255, 255]]

        def predict(self, image, resize=True):
            h, w = image.shape[:2]
            return np.zeros((h, w), np.uint8), np.zeros((h, w, 2), np.float32)

    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(tmp_path / "a.png")
    with small_disk(tmp_path) as disk:
        plans = predict.plan_outputs([tmp_path / "a.png"], disk / "out", save_logits=True)
        with pytest.raises(InputError, match=r"out/a_logits\.npy: cannot write: No space left "
                                             r"on device$"):
            predict.write_predictions(Zeros(), plans, progress=False)
        assert sorted(p.name for p in (disk / "out").iterdir()) == ["a.png", "a_overlay.png"]


def test_predict_skips_unreadable_files(tmp_path: Path, segmenter: Segmenter):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "good.png")
    out = tmp_path / "o"
    report = predict.predict_files(segmenter, [tmp_path], out, progress=False)
    assert [r.input.name for r in report.written] == ["good.png"]
    assert sorted(p.name for p in report.failed) == ["bomb.png", "broken.png"]
    assert "bomb.png: refusing to decode" in report.failed[tmp_path / "bomb.png"]
    assert sorted(p.name for p in out.iterdir()) == ["good.png", "good_overlay.png"]
    with pytest.raises(InputError, match="missing.png"):
        predict.plan_outputs([tmp_path / "missing.png"], out)
    with pytest.raises(CheckpointError, match="nowhere"):
        weights.load(build_model(fcn_config().model), tmp_path / "nowhere")


def test_cli_save_logits_matches_mmseg(tmp_path: Path, pth: Path, drive_01: Path,
                                       segmenter: Segmenter):
    """.pth -> unet_jax.convert weights folder -> predict CLI --save_logits == mmseg's logits,
    and exactly the scores of Segmenter.predict."""
    ref = np.load(require_shared(FIXTURES / "inference" / "drive_01_test_inference_model.npz"))
    weights = tmp_path / "weights"
    convert.import_mmseg(fcn_config(), pth, weights)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "unet_jax.predict", "--config", "configs/drive.py:fcn,ce",
           *TINY, "--checkpoint", str(weights), "--input", str(drive_01),
           "--output", str(out), "--save_logits"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out.absolute()) in proc.stdout
    label = check_outputs(out, "01_test", (584, 565), True)
    logits = np.load(out / "01_test_logits.npy")
    err = float(np.abs(logits - ref["seg_logits"].transpose(1, 2, 0)).max())
    assert err <= 3e-4, f"--save_logits vs mmseg: max abs error {err}"
    check_argmax(label, ref["seg_logits"], ref["pred"], atol=3e-4)
    api_labels, api_scores = segmenter.predict(read_rgb(drive_01))
    np.testing.assert_array_equal(logits, api_scores)
    np.testing.assert_array_equal(label, api_labels)


def test_cli_skips_unreadable_images(tmp_path: Path, pth: Path):
    """Bad files: one stderr line each and a summary; the others are written; exit code 1. The
    compiled programs are kept in the user cache folder ($XDG_CACHE_HOME/unet_jax/jax)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "bad.tif").write_bytes(b"\x00" * 10)
    (inputs / "bomb.png").write_bytes(png_header(100_000, 100_000))
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(inputs / "good.png")
    env = _without_suite_cache(tmp_path / "cache")
    cmd = [sys.executable, "-m", "unet_jax.predict", "--config", "configs/drive.py", *TINY,
           "--checkpoint", str(pth), "--input", str(inputs), "--output", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "wrote label maps + overlays of 1 image(s)" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("unet_jax.predict: ")]
    assert len(lines) == 3, proc.stderr[-3000:]
    assert "bad.tif: cannot read as an image" in lines[0]
    assert "bomb.png: refusing to decode" in lines[1]
    assert lines[2] == (f"unet_jax.predict: 2 of 3 images could not be read: {inputs / 'bad.tif'}"
                        f", {inputs / 'bomb.png'}")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good.png", "good_overlay.png"]
    assert len(list((tmp_path / "cache" / "unet_jax" / "jax").iterdir())) >= 3


def test_cli_compilation_cache_off_by_flag(tmp_path: Path, pth: Path):
    """With --nocompilation_cache nothing is written under $XDG_CACHE_HOME (the run above, the
    same command without it, fills $XDG_CACHE_HOME/unet_jax/jax)."""
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "a.png")
    env = _without_suite_cache(tmp_path / "cache")
    cmd = [sys.executable, "-m", "unet_jax.predict", "--config", "configs/drive.py", *TINY,
           "--checkpoint", str(pth), "--input", str(tmp_path / "a.png"),
           "--output", str(tmp_path / "out"), "--nocompilation_cache"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "a.png").is_file()
    assert not (tmp_path / "cache").exists()


def _without_suite_cache(xdg_cache: Path) -> dict[str, str]:
    """A CLI subprocess's environment with its user cache folder in `xdg_cache` instead of the
    suite's shared compilation cache (JAX_COMPILATION_CACHE_DIR, which JAX itself reads)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XDG_CACHE_HOME=str(xdg_cache))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


# ------------------------------------------------------------------------------ ISBI submission
@pytest.fixture(scope="module")
def isbi_segmenter() -> Segmenter:
    """configs/isbi2012.py:cpu at base width 2 (random weights), 252 -> 68 overlap tiles."""
    from unet_jax.config import check_config, load_config
    config = load_config(str(REPO / "configs" / "isbi2012.py:cpu"))
    config.model.base_channels = 2
    config.eval.update(dict(crop_size=(252, 252), stride=(68, 68)))
    config = check_config(config)
    return Segmenter(config, build_model(config.model))


def test_isbi_submission_is_p_cell_of_the_saved_logits_in_name_order(tmp_path: Path,
                                                                     isbi_segmenter: Segmenter):
    """Overlap-tile (unet2015) logits at the input size; one float32 TIFF page per slice, in
    natural name order, each the softmax of that slice's saved logits at the cell class."""
    folder = tmp_path / "slices"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("10.png", "2.png"):   # name order: 2 before 10 (lexicographic would swap)
        Image.fromarray(rng.integers(0, 256, (60, 90), dtype=np.uint8)).save(folder / name)
    out, tif = tmp_path / "out", tmp_path / "submission.tif"
    plans = predict.plan_outputs([folder], out, save_logits=True)
    sub = predict.check_submission_path(tif, plans)
    report = predict.write_predictions(isbi_segmenter, plans, resize=False, progress=False,
                                       submission=sub)
    assert len(report.written) == 2 and not report.failed
    with Image.open(tif) as img:
        assert img.format == "TIFF" and img.n_frames == 2
        pages = []
        for k in range(2):
            img.seek(k)
            assert img.mode == "F" and img.tag_v2[339] == (3,) and img.tag_v2[258] == (32,)
            pages.append(np.array(img))
    for page, stem in zip(pages, ("2", "10")):
        logits = np.load(out / f"{stem}_logits.npy").astype(np.float64)
        assert logits.shape == (60, 90, 2) and page.shape == (60, 90) and page.dtype == np.float32
        want = 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))  # softmax, cell = class 1
        np.testing.assert_allclose(page, want, rtol=0, atol=2 ** -23)  # float32 rounding of [0, 1]
    assert not np.array_equal(pages[0], pages[1])
    # a rerun may replace the submission predict wrote; other files are refused
    assert predict.check_submission_path(tif, plans) == tif


def test_isbi_submission_refusals(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "b.tif")
    plans = predict.plan_outputs([folder], tmp_path / "out")
    for path, match in [(tmp_path / "s.png", "expected a .tif or .tiff"),
                        (folder / "b.tif", r"is also .*in/b\.tif \(an input"),
                        (tmp_path / "in", "expected a .tif")]:
        with pytest.raises(InputError, match=match):
            predict.check_submission_path(path, plans)
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "theirs.tif")
    with pytest.raises(InputError, match="not written by unet_jax.predict"):
        predict.check_submission_path(tmp_path / "theirs.tif", plans)
    with pytest.raises(InputError, match="differ in size"):
        predict.save_submission(tmp_path / "s.tif", [np.zeros((4, 4)), np.zeros((4, 5))])
    assert not (tmp_path / "s.tif").exists()


def test_cell_probability_of_tta_scores_and_of_one_sigmoid_channel():
    from ml_collections import ConfigDict
    logits = np.array([[[0.0, np.log(3.0)]]], np.float32)
    plain = ConfigDict(dict(eval=dict(tta=False)))
    assert predict.cell_probability(logits, plain) == pytest.approx(0.75)
    assert predict.cell_probability(np.array([[[0.2, 0.8]]]),
                                    ConfigDict(dict(eval=dict(tta=True)))) == pytest.approx(0.8)
    assert predict.cell_probability(np.array([[[np.log(3.0)]]]), plain) == pytest.approx(0.75)
