"""IoUMetric semantics against mmseg's recorded values (fixtures/mmseg/metrics.npz)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from unet_jax import metrics as M


@pytest.fixture
def metrics_npz(request):
    fixtures_dir = request.getfixturevalue("fixtures_dir")
    return dict(np.load(fixtures_dir / "metrics.npz"))


def _pairs(d, c):
    return [(d[f"C{c}_pred_{i}"], d[f"C{c}_gt_{i}"]) for i in range(4)]


@pytest.mark.parametrize("num_classes", [2, 19])
def test_histograms_and_totals(metrics_npz, num_classes):
    d = metrics_npz
    acc = M.ConfusionAccumulator(num_classes)
    iu_jit = jax.jit(M.intersect_and_union_jnp, static_argnums=(2,))
    for i, (pred, gt) in enumerate(_pairs(d, num_classes)):
        counts = M.intersect_and_union(pred, gt, num_classes)
        counts_jnp = np.asarray(iu_jit(pred, gt, num_classes))
        for j, name in enumerate(("intersect", "union", "pred_area", "label_area")):
            assert counts[j].dtype == np.int64
            np.testing.assert_array_equal(counts[j], d[f"C{num_classes}_{name}_{i}"], err_msg=name)
            np.testing.assert_array_equal(counts_jnp[j], counts[j], err_msg=name)
        acc.add(pred, gt)
    assert acc.num_images == 4
    for name, value in acc.as_arrays().items():
        np.testing.assert_array_equal(value, d[f"C{num_classes}_total_{name}"], err_msg=name)

    # merge: two halves add up to the whole; counts from the jnp path add up the same.
    a, b = M.ConfusionAccumulator(num_classes), M.ConfusionAccumulator(num_classes)
    for i, (pred, gt) in enumerate(_pairs(d, num_classes)):
        if i < 2:
            a.add(pred, gt)
        else:
            b.add_counts(iu_jit(pred, gt, num_classes))
    merged = a.merge(b)
    assert merged.num_images == 4
    for name, value in merged.as_arrays().items():
        np.testing.assert_array_equal(value, d[f"C{num_classes}_total_{name}"], err_msg=name)


@pytest.mark.parametrize("num_classes", [2, 19])
def test_per_class_and_summary(metrics_npz, num_classes):
    d = metrics_npz
    acc = M.ConfusionAccumulator(num_classes)
    for pred, gt in _pairs(d, num_classes):
        acc.add(pred, gt)
    per_class = M.per_class_metrics(acc)
    np.testing.assert_allclose(per_class["aAcc"], float(d[f"C{num_classes}_aAcc"]), rtol=1e-6)
    for key in ("IoU", "Dice", "Acc"):
        expected = d[f"C{num_classes}_{key}"].astype(np.float64)
        np.testing.assert_array_equal(np.isnan(per_class[key]), np.isnan(expected), err_msg=key)
        np.testing.assert_allclose(per_class[key], expected, rtol=1e-6, atol=1e-7, err_msg=key)

    names = [f"class{i}" for i in range(num_classes)]
    summary = M.summarize(acc, names)
    for key in ("aAcc", "mIoU", "mAcc", "mDice"):
        # mmseg's values are float32 copies of 2-decimal numbers.
        assert summary[key] == pytest.approx(float(d[f"C{num_classes}_summary_{key}"]), abs=1e-4)
    for key in ("IoU", "Dice", "Acc"):
        expected = d[f"C{num_classes}_{key}"]
        for name, value in zip(names, expected):
            if np.isnan(value):
                assert summary[key][name] is None
            else:
                assert summary[key][name] == round(float(value) * 100, 2) or \
                    abs(summary[key][name] - float(value) * 100) <= 0.005 + 1e-6
    json.loads(json.dumps(summary, allow_nan=False))  # JSON-serialisable, no NaN literals

    table = M.format_table(summary, names)
    assert "IoU" in table and "Dice" in table and "Acc" in table
    assert f"{summary['mIoU']:.2f}" in table
    if num_classes == 19:
        # class 17: never in gt, predicted -> IoU/Dice 0, Acc NaN; class 18: all NaN.
        assert summary["IoU"]["class17"] == 0.0 and summary["Acc"]["class17"] is None
        assert summary["IoU"]["class18"] is None and summary["Dice"]["class18"] is None
        assert "nan" in table.splitlines()[-4]


def test_counts_accept_tuples_and_dicts():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    gt = np.array([[0, 1, 255], [2, 1, 1]])
    counts = M.intersect_and_union(pred, gt, 3)
    np.testing.assert_array_equal(np.stack(counts), [[1, 1, 1], [2, 3, 2], [2, 1, 2], [1, 3, 1]])
    s_tuple = M.summarize(counts, ["a", "b", "c"])
    s_dict = M.summarize(dict(zip(M.COUNT_NAMES, counts)), ["a", "b", "c"])
    assert s_tuple == s_dict
    assert s_tuple["aAcc"] == 60.0 and s_tuple["IoU"] == {"a": 50.0, "b": 33.33, "c": 50.0}


def test_errors_name_values():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        M.intersect_and_union(np.zeros((2, 3)), np.zeros((2, 2)), 2)
    acc = M.ConfusionAccumulator(2)
    with pytest.raises(ValueError, match="3"):
        M.summarize(acc, ["a", "b", "c"])
    with pytest.raises(ValueError, match="19"):
        acc.merge(M.ConfusionAccumulator(19))


def test_table_with_fov_metrics():
    counts = M.intersect_and_union(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]]), 2)
    summary = M.summarize(counts, ["background", "vessel"])
    plain = M.format_table(summary, ["background", "vessel"])
    summary["fov"] = {"Se": 81.5, "Sp": 97.25, "Acc": 95.0, "AUC": 98.13, "F1": None}
    lines = M.format_table(summary, ["background", "vessel"]).splitlines()
    assert "\n".join(lines[:len(plain.splitlines())]) == plain  # the mmseg table unchanged
    sep = "+---------------+-------+-------+-------+-------+-----+"
    assert lines[len(plain.splitlines()):] == [
        sep, "| FOV metrics   |    Se |    Sp |   Acc |   AUC |  F1 |", sep,
        "| vessel in FOV | 81.50 | 97.25 | 95.00 | 98.13 | nan |", sep]
