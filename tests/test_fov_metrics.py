"""FOV vessel metrics (Se, Sp, Acc, AUC, F1) against references written out here in numpy."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from unet_jax import fov_metrics as FM


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Exact AUC, Mann-Whitney: (sum of the positives' ranks - n+(n+ + 1)/2) / (n+ n-), with
    tied scores given their average rank."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, np.float64)
    start = 0
    while start < scores.size:  # one run of equal scores at a time
        end = start
        while end + 1 < scores.size and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    n_pos = int(positive.sum())
    n_neg = scores.size - n_pos
    return (ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def pairwise_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(s+ > s-) + P(s+ = s-) / 2 over all (positive, negative) pairs."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def maps(seed: int, shapes=((9, 11), (16, 7), (12, 12)), levels: int = 0):
    """A few (prob, label with 255s, fov) maps; probabilities quantised to `levels` if > 0."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        label = (rng.random((h, w)) < 0.3).astype(np.uint8)
        prob = np.clip(0.35 * label + rng.normal(0.3, 0.25, (h, w)), 0, 1).astype(np.float32)
        if levels:
            prob = (np.round(prob * levels) / levels).astype(np.float32)
        label[rng.random((h, w)) < 0.1] = 255
        fov = (rng.random((h, w)) < 0.8).astype(np.uint8)
        out.append((prob, label, fov))
    return out


def numpy_reference(samples) -> dict[str, float]:
    """Se, Sp, Acc, F1 of `prob > 0.5` and the rank AUC, pooled over FOV pixels not ignored."""
    keep = [(f == 1) & (l != 255) for p, l, f in samples]
    prob = np.concatenate([p[k] for (p, _, _), k in zip(samples, keep)])
    truth = np.concatenate([l[k] for (_, l, _), k in zip(samples, keep)]) == 1
    pred = prob > 0.5
    tp, tn = np.sum(pred & truth), np.sum(~pred & ~truth)
    fp, fn = np.sum(pred & ~truth), np.sum(~pred & truth)
    return {"Se": tp / (tp + fn), "Sp": tn / (tn + fp), "Acc": (tp + tn) / truth.size,
            "AUC": rank_auc(prob, truth), "F1": 2 * tp / (2 * tp + fp + fn)}


def accumulate(samples) -> FM.FovAccumulator:
    acc = FM.FovAccumulator()
    for prob, label, fov in samples:
        acc.add(prob, prob > 0.5, label, fov)
    return acc


def test_rank_formula_is_the_pairwise_auc():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300) * 20) / 20  # many ties
    positive = rng.random(300) < 0.4
    assert rank_auc(scores, positive) == pytest.approx(pairwise_auc(scores, positive), abs=1e-12)


@pytest.mark.parametrize("levels", [0, 8])
def test_metrics_match_the_numpy_reference(levels):
    samples = maps(1, levels=levels)
    acc = accumulate(samples)
    ref = numpy_reference(samples)
    got = acc.metrics()
    for key in ("Se", "Sp", "Acc", "F1"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    # ties share a bin, so quantised probabilities (8 levels, far apart) give the exact AUC;
    # continuous ones may share a bin with a neighbour: within the bound (here 8e-5, a tied
    # pair among only ~7000)
    assert abs(got["AUC"] - ref["AUC"]) <= (1e-12 if levels else acc.auc_error_bound())
    assert acc.num_images == 3
    assert int(acc.confusion.sum()) == int(acc.histogram.sum()) == sum(
        int(((f == 1) & (l != 255)).sum()) for _, l, f in samples)
    summary = acc.summary()
    assert list(summary) == ["Se", "Sp", "Acc", "AUC", "F1"]
    rounded = {k: round(v * 100, 2) for k, v in ref.items()}
    assert {k: v for k, v in summary.items() if k != "AUC"} == {
        k: v for k, v in rounded.items() if k != "AUC"}
    assert abs(summary["AUC"] - rounded["AUC"]) <= (0 if levels else 0.01 + 1e-9)


def test_scores_fov_counts_from_logits_and_probabilities():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (10, 13, 2)).astype(np.float32)
    label = (rng.random((10, 13)) < 0.3).astype(np.uint8)
    fov = (rng.random((10, 13)) < 0.7).astype(np.uint8)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    vessel = probs[..., 1]
    expect = FM.FovAccumulator()
    expect.add(vessel, logits.argmax(-1) == 1, label, fov)
    for scores, probabilities in ((logits, False), (probs, True)):  # logits, or TTA-like probs
        acc = FM.FovAccumulator()
        acc.add_counts(*FM.scores_fov_counts(scores, label, fov, probabilities=probabilities,
                                             ignore_index=255))
        np.testing.assert_array_equal(acc.confusion, expect.confusion)
        np.testing.assert_array_equal(acc.histogram, expect.histogram)
    assert acc.auc() == pytest.approx(rank_auc(vessel[fov == 1], label[fov == 1] == 1), abs=1e-12)


def logit_mixture(rng, n, parts):
    which = rng.choice(len(parts), size=n, p=[w for w, _, _ in parts])
    return rng.normal(np.array([m for _, m, _ in parts])[which],
                      np.array([s for _, _, s in parts])[which])


def test_binned_auc_within_0_01_points_of_exact_on_realistic_scores():
    """Trained-model-like log-odds (experiments/studies/fov_auc_bins.py), as float32 softmax sees them;
    x3 makes the model overconfident: many probabilities saturate at exactly 0 or 1."""
    rng = np.random.default_rng(3)
    n = 200_000
    positive = rng.random(n) < 0.12
    z = np.where(positive,
                 logit_mixture(rng, n, [(0.7, 6.0, 2.5), (0.2, 1.0, 2.5), (0.1, -3.0, 2.5)]),
                 logit_mixture(rng, n, [(0.85, -9.0, 2.0), (0.12, -4.0, 2.0), (0.03, 0.0, 2.5)]))
    ones = np.ones(n, np.uint8)
    for scale in (1.0, 3.0):
        logits = np.stack([np.zeros(n), scale * z], -1).astype(np.float32)
        prob = np.asarray(jax.nn.softmax(logits, axis=-1))[:, 1]
        acc = FM.FovAccumulator()
        acc.add(prob, prob > 0.5, positive.astype(np.uint8), ones)
        exact = rank_auc(prob, positive)
        error = abs(acc.auc() - exact)
        assert 0.97 < exact < 0.995
        assert error <= acc.auc_error_bound() + 1e-12 and error < 1e-6, (scale, error)
        assert acc.auc_error_bound() < 1e-4, scale  # even the guaranteed bound is in budget
    # why not 2**16 bins uniform in p: the confident background and the missed vessels all
    # land in bin 0, and counting them as ties costs 100x the budget
    bins = np.minimum((prob.astype(np.float64) * 2**16).astype(np.int64), 2**16 - 1)
    pos = np.bincount(bins[positive], minlength=2**16).astype(np.float64)
    neg = np.bincount(bins[~positive], minlength=2**16).astype(np.float64)
    uniform = np.sum(pos * (np.cumsum(neg) - neg / 2)) / (pos.sum() * neg.sum())
    assert abs(uniform - exact) > 1e-3


def test_bins_are_monotone_and_keep_ties():
    tiny = np.float32(np.finfo(np.float32).tiny)
    half = np.float32(0.5)
    values = np.array([0.0, tiny, 1e-30, 1e-7, 0.01, 0.3, np.nextafter(half, np.float32(0)), half,
                       np.nextafter(half, np.float32(1)), 0.7, 0.99, 1 - 1e-6,
                       np.nextafter(np.float32(1), np.float32(0)), 1.0],
                      np.float32)
    grid = np.sort(np.concatenate([values, [1e-45, 1e-40], np.random.default_rng(4).random(
        5000, np.float32)]).astype(np.float32))
    bins = np.asarray(FM.probability_bins(grid))
    assert bins.dtype == np.int32 and bins.min() == 0 and bins.max() == FM.NUM_BINS - 1
    assert (np.diff(bins) >= 0).all()  # monotone: the trapezoid rule never reorders pixels
    distinct = np.asarray(FM.probability_bins(values))
    assert len(set(distinct.tolist())) == len(values)  # each kept apart, even 1 ulp apart at 1/2
    # 2**11 bins per octave at every scale below 1/2 (and of 1 - p above): a step of 2**-9
    # (relative) is 4 m bins for the float32 mantissa m in [1, 2)
    for p in (1e-20, 1e-3, 0.2, 0.9):
        q = np.float32(p) * np.float32(1 + 2**-9) if p < 0.5 else 1 - (1 - np.float32(p)) / (
            np.float32(1 + 2**-9))
        step = abs(int(FM.probability_bins(q)) - int(FM.probability_bins(np.float32(p))))
        assert 4 <= step <= 8, (p, step)


def test_merge_adds_up_and_empty_is_none():
    samples = maps(5, levels=16)
    whole = accumulate(samples)
    merged = accumulate(samples[:1]).merge(accumulate(samples[1:]))
    np.testing.assert_array_equal(merged.confusion, whole.confusion)
    np.testing.assert_array_equal(merged.histogram, whole.histogram)
    assert merged.num_images == 3 and merged.summary() == whole.summary()
    empty = FM.FovAccumulator()
    assert empty.summary() == dict.fromkeys(FM.METRIC_NAMES)  # 0/0 everywhere: None, not NaN
    json.dumps(empty.summary(), allow_nan=False)
    with pytest.raises(ValueError, match="ignore_index"):
        empty.merge(FM.FovAccumulator(ignore_index=0))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        empty.add_counts(np.zeros(3), np.zeros((2, FM.NUM_BINS)))
