"""evaluate(): dataset-level counts and metrics, max_images, examples; overlay images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jax
from conftest import FIXTURES, require_shared, tiny_config
from test_fov_metrics import rank_auc
from unet_jax import inference as inf
from unet_jax import run_logs
from unet_jax.evaluate import colorize, evaluate, overlay_image, save_comparison_png
from unet_jax.models.mmseg import extract_state_dict, load_state_dict
from unet_jax.models import build_model
from unet_jax.io.pth import load_pth


def eval_config():
    """The fixture fcn_drive at 32 x 32 windows; small synthetic images rescaled (keep ratio)
    to fit 72 x 56."""
    return tiny_config("configs/drive.py:fcn", {
        "eval.crop_size": (32, 32), "eval.stride": (21, 21), "eval.batch_windows": 8,
        "data.img_scale": (72, 56)})


@pytest.fixture(scope="module")
def apply_fn():
    path = require_shared(FIXTURES / "models" / "fcn_drive.pth")
    model = build_model(eval_config().model)
    load_state_dict(model, extract_state_dict(load_pth(path), path), str(path))
    return inf.make_apply_fn(model)


def synthetic_samples(n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    shapes = [(40, 50), (56, 72), (45, 33), (64, 64)][:n]
    out = []
    for k, (h, w) in enumerate(shapes):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[h // 3: h // 2] = (40, 200, 90)  # a band the model should react to
        label = (rng.random((h, w)) < 0.2).astype(np.uint8)
        label[rng.random((h, w)) < 0.05] = 255
        out.append({"image": image, "label": label, "name": f"img{k}".encode()})
    return out


def numpy_summary(preds: list[np.ndarray], labels: list[np.ndarray], num_classes: int = 2):
    """mmseg's IoUMetric written out directly in numpy (percent, rounded to 2 decimals)."""
    inter = np.zeros(num_classes)
    parea = np.zeros(num_classes)
    larea = np.zeros(num_classes)
    for p, g in zip(preds, labels):
        keep = g != 255
        p, g = p[keep], g[keep]
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (g == c))
            parea[c] += np.sum(p == c)
            larea[c] += np.sum(g == c)
    union = parea + larea - inter
    return {"aAcc": round(inter.sum() / larea.sum() * 100, 2),
            "mIoU": round(np.nanmean(inter / union) * 100, 2),
            "mDice": round(np.nanmean(2 * inter / (parea + larea)) * 100, 2),
            "mAcc": round(np.nanmean(inter / larea) * 100, 2)}


def test_evaluate_matches_numpy(apply_fn):
    config = eval_config()
    samples = synthetic_samples(3)
    result = evaluate(apply_fn, samples, config, progress=False, num_examples=2)
    summary, examples = result.summary, result.examples
    preds = [np.asarray(inf.segment(apply_fn, s["image"], config)[1]) for s in samples]
    assert len({int(p.sum()) for p in preds}) > 1 or preds[0].any()  # not a constant model
    expect = numpy_summary(preds, [s["label"] for s in samples])
    for key, value in expect.items():
        assert summary[key] == pytest.approx(value, abs=1e-9), key
    assert set(summary["IoU"]) == {"background", "vessel"}
    assert [e["name"] for e in examples] == ["img0", "img1"]
    for e, p, s in zip(examples, preds, samples):
        assert e["pred"].shape == s["label"].shape
        np.testing.assert_array_equal(e["pred"], p)


def test_evaluate_max_images(apply_fn):
    config = eval_config()
    samples = synthetic_samples(3)
    config.eval.max_images = 2
    limited = evaluate(apply_fn, iter(samples), config, progress=False)
    config.eval.max_images = 0
    first_two = evaluate(apply_fn, samples[:2], config, progress=False)
    assert limited == first_two and limited.examples == []
    assert limited.summary != evaluate(apply_fn, samples, config, progress=False).summary


def with_fov(samples: list[dict]) -> list[dict]:
    """The samples with a disc-shaped field of view (a random shift per image)."""
    rng = np.random.default_rng(1)
    out = []
    for s in samples:
        h, w = s["label"].shape
        yy, xx = np.mgrid[:h, :w]
        cy, cx = h / 2 + rng.normal(0, 2), w / 2 + rng.normal(0, 2)
        fov = ((yy - cy) ** 2 + (xx - cx) ** 2 <= (0.45 * min(h, w)) ** 2).astype(np.uint8)
        out.append(dict(s, fov=fov))
    return out


def fov_reference(scores: list[np.ndarray], samples: list[dict], probabilities: bool) -> dict:
    """Se, Sp, Acc, AUC, F1 (percent, 2 decimals) over the FOV pixels not ignored, in numpy:
    vessel = the argmax of the scores, AUC ranks the vessel probability (rank formula)."""
    probs, preds, truths = [], [], []
    for sc, s in zip(scores, samples):
        keep = (s["fov"] == 1) & (s["label"] != 255)
        prob = sc if probabilities else np.asarray(jax.nn.softmax(sc, axis=-1))
        probs.append(prob[..., 1][keep])
        preds.append(sc.argmax(-1)[keep] == 1)
        truths.append(s["label"][keep] == 1)
    prob, pred, truth = (np.concatenate(v) for v in (probs, preds, truths))
    tp, tn = np.sum(pred & truth), np.sum(~pred & ~truth)
    fp, fn = np.sum(pred & ~truth), np.sum(~pred & truth)
    ref = {"Se": tp / (tp + fn), "Sp": tn / (tn + fp), "Acc": (tp + tn) / truth.size,
           "AUC": rank_auc(prob, truth), "F1": 2 * tp / (2 * tp + fp + fn)}
    return {k: round(float(v) * 100, 2) for k, v in ref.items()}


def assert_fov_equal(got: dict, ref: dict) -> None:
    assert list(got) == ["Se", "Sp", "Acc", "AUC", "F1"]
    assert {k: got[k] for k in ("Se", "Sp", "Acc", "F1")} == {
        k: ref[k] for k in ("Se", "Sp", "Acc", "F1")}
    assert abs(got["AUC"] - ref["AUC"]) <= 0.01 + 1e-9  # binned AUC: < 1e-4 from the exact one


def test_evaluate_fov_metrics_match_numpy(apply_fn, capsys):
    config = eval_config()
    samples = with_fov(synthetic_samples(3))
    summary = evaluate(apply_fn, samples, config, progress=False).summary
    scores = [np.asarray(inf.segment(apply_fn, s["image"], config)[0]) for s in samples]
    ref = fov_reference(scores, samples, probabilities=False)
    assert 0 < ref["Se"] < 100 and 0 < ref["Sp"] < 100  # a model that is not constant
    assert_fov_equal(summary["fov"], ref)
    # the mmseg metrics ignore the FOV
    plain = evaluate(apply_fn, synthetic_samples(3), config, progress=False).summary
    assert "fov" not in plain and {k: v for k, v in summary.items() if k != "fov"} == plain
    run_logs.print_table(summary, config, step=7)
    out = capsys.readouterr().out
    assert "| FOV metrics   |    Se |    Sp |   Acc |   AUC |    F1 |" in out
    assert "| vessel in FOV |" in out
    assert f"{summary['fov']['AUC']:.2f}" in out
    assert "FOV: official masks (training/mask, test/mask)" in out  # config.data.name: drive


def test_evaluate_fov_auc_uses_the_tta_probabilities(apply_fn):
    config = eval_config()
    config.eval.tta = True
    config.eval.tta_scales = (1.0, 0.75)
    samples = with_fov(synthetic_samples(2))
    summary = evaluate(apply_fn, samples, config, progress=False).summary
    scores = [np.asarray(inf.segment(apply_fn, s["image"], config)[0]) for s in samples]
    assert all(np.allclose(sc.sum(-1), 1, atol=1e-5) for sc in scores)  # probabilities
    assert_fov_equal(summary["fov"], fov_reference(scores, samples, probabilities=True))


def test_evaluate_rejects_bad_samples(apply_fn):
    config = eval_config()
    bad = synthetic_samples(1)
    bad[0]["label"] = bad[0]["label"][:-1]
    with pytest.raises(ValueError, match="img0.*label shape"):
        evaluate(apply_fn, bad, config, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(apply_fn, [], config, progress=False)
    mixed = with_fov(synthetic_samples(2))
    del mixed[1]["fov"]
    with pytest.raises(ValueError, match="img1.*fov mask on every sample or on none"):
        evaluate(apply_fn, mixed, config, progress=False)
    bad = with_fov(synthetic_samples(1))
    bad[0]["fov"] = bad[0]["fov"][:, :-1]
    with pytest.raises(ValueError, match="img0.*fov shape"):
        evaluate(apply_fn, bad, config, progress=False)


def test_overlay_and_comparison(tmp_path: Path):
    palette = [(120, 120, 120), (6, 230, 230)]
    image = np.full((4, 5, 3), 100, np.uint8)
    label = np.array([[0, 1, 255, 0, 1]] * 4, np.uint8)
    over = overlay_image(image, label, palette, alpha=0.5)
    assert over.dtype == np.uint8 and over.shape == (4, 5, 3)
    np.testing.assert_array_equal(over[0, 0], [110, 110, 110])
    np.testing.assert_array_equal(over[0, 1], [53, 165, 165])
    np.testing.assert_array_equal(over[0, 2], [100, 100, 100])  # ignore: image unchanged
    np.testing.assert_array_equal(colorize(label, palette)[0, 2], [0, 0, 0])
    path = save_comparison_png(tmp_path / "sub" / "cmp.png", image, label, label[:, ::-1],
                               palette)
    saved = np.asarray(Image.open(path))
    assert saved.shape == (4, 3 * 5 + 2 * 4, 3)
    np.testing.assert_array_equal(saved[:, :5], image)
    np.testing.assert_array_equal(saved[:, 9:14], colorize(label, palette))
    np.testing.assert_array_equal(saved[:, 18:], colorize(label[:, ::-1], palette))


def test_counts_summed_over_processes_equal_the_merged_counts(monkeypatch):
    """Two processes (threads here) exchange their counts through the all-gather: each gets
    the merged accumulators, also when one process saw no FOV sample; int64 counts above
    2**31 survive the int32 transport."""
    import threading

    from unet_jax import evaluate as ev
    from unet_jax import fov_metrics, metrics

    big = np.array([2**40 + 3, -5, 2**62], np.int64)  # the real transport, on one process
    np.testing.assert_array_equal(ev._allgather_int64(big), big[None])
    rng = np.random.default_rng(0)
    accs = []
    for _ in range(2):
        acc = metrics.ConfusionAccumulator(2)
        acc.add_counts(rng.integers(0, 2**40, (4, 2)), num_images=3)
        accs.append(acc)
    fov = fov_metrics.FovAccumulator()
    fov.add_counts(rng.integers(0, 2**40, 4), rng.integers(0, 2**35, (2, fov_metrics.NUM_BINS)),
                   num_images=2)
    fovs = [fov, None]

    slots: list = [None, None]
    barrier = threading.Barrier(2)
    local = threading.local()

    def allgather(values):
        barrier.wait()
        slots[local.rank] = np.asarray(values, np.int64)
        barrier.wait()
        gathered = np.stack(slots)
        barrier.wait()
        return gathered

    monkeypatch.setattr(ev, "_allgather_int64", allgather)
    results: list = [None, None]

    def process(rank):
        local.rank = rank
        results[rank] = ev._summed_over_processes(accs[rank], fovs[rank])

    threads = [threading.Thread(target=process, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    merged = accs[0].merge(accs[1])
    for acc, fov_acc in results:
        assert acc.num_images == 6
        for name in metrics.COUNT_NAMES:
            np.testing.assert_array_equal(getattr(acc, name), getattr(merged, name))
        assert fov_acc.num_images == 2
        np.testing.assert_array_equal(fov_acc.confusion, fov.confusion)
        np.testing.assert_array_equal(fov_acc.histogram, fov.histogram)
