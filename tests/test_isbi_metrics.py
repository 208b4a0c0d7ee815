"""The ISBI 2012 metrics (unet_jax.isbi_metrics) on hand-computed cases and against brute-force
pair counting and a separately written mutual information."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from unet_jax import isbi_metrics as M


def _singletons(proposal: np.ndarray) -> np.ndarray:
    """Proposal-0 pixels relabelled as singletons (unique labels above the others)."""
    out = proposal.astype(np.int64).copy()
    zeros = np.flatnonzero(out.ravel() == 0)
    out.ravel()[zeros] = out.max() + 1 + np.arange(zeros.size)
    return out


def _brute_rand(gt: np.ndarray, proposal: np.ndarray) -> tuple[int, int, int]:
    """Ordered pairs (x, y), x = y included, of ground-truth foreground pixels: same segment in
    both (tp), same proposal segment only (fp), same ground-truth segment only (fn)."""
    s = _singletons(proposal).ravel()
    g = gt.ravel()
    fg = np.flatnonzero(g)
    tp = fp = fn = 0
    for x, y in itertools.product(fg, fg):
        same_g, same_s = g[x] == g[y], s[x] == s[y]
        tp += same_g and same_s
        fp += same_s and not same_g
        fn += same_g and not same_s
    return tp, fp, fn


def _entropy(labels: np.ndarray) -> float:
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-np.sum(p * np.log(p)))


CASES = [
    # ground-truth components, proposal labels (0 = membrane)
    (np.array([[1, 1, 0, 2, 2], [1, 1, 0, 2, 2]]), np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]])),
    (np.array([[1, 1, 1, 0, 2], [3, 3, 0, 0, 2]]), np.array([[1, 2, 2, 0, 3], [1, 0, 0, 4, 3]])),
    (np.array([[1, 1], [1, 1]]), np.array([[0, 0], [1, 2]])),
    (np.array([[1, 1, 2, 2, 0], [1, 3, 3, 2, 4]]), np.array([[1, 1, 1, 2, 2], [0, 3, 3, 2, 0]])),
]


@pytest.mark.parametrize("gt, proposal", CASES)
def test_rand_stats_equal_brute_force_pair_counts(gt, proposal):
    np.testing.assert_allclose(M.rand_stats(gt, proposal), _brute_rand(gt, proposal),
                               rtol=1e-12)


@pytest.mark.parametrize("gt, proposal", [CASES[1], CASES[3]])
def test_info_fscore_equals_mutual_information_over_entropies(gt, proposal):
    fg = gt.ravel() != 0
    a, b = gt.ravel()[fg], _singletons(proposal).ravel()[fg]
    joint = a * (b.max() + 1) + b
    mi = _entropy(a) + _entropy(b) - _entropy(joint)
    ha, hb = _entropy(a), _entropy(b)
    p, r = mi / ha, mi / hb
    assert M.info_fscore(gt, proposal) == pytest.approx(2 * p * r / (p + r), rel=1e-12)


def test_info_fscore_degenerate_cases_follow_fiji():
    """One ground-truth segment (H(gt) = 0): precision 0, recall 1 -> F = 0; one proposal
    segment over the foreground (H(proposal) = 0) likewise F = 0."""
    assert M.info_fscore(*CASES[2]) == 0.0 and M.info_fscore(*CASES[0]) == 0.0


def test_rand_by_hand_merge_of_two_cells():
    """Two 4-pixel cells merged into one proposal segment: tp = 32, fp = 32, fn = 0 -> F = 2/3."""
    gt, proposal = CASES[0][0], np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert M.rand_stats(gt, proposal) == (32.0, 32.0, 0.0)


def test_thinning_leaves_one_pixel_lines_and_keeps_a_thin_membrane():
    cells = np.ones((5, 9), bool)
    cells[:, 3:6] = False            # a 3-px membrane between two cells
    labels = M.thin(cells)
    assert set(np.unique(labels[:, :4])) == {labels[0, 0]} and labels[0, 0] > 0
    assert np.all(labels[:, 4] == 0) and set(np.unique(labels[:, 5:])) == {labels[0, 8]}
    assert labels[0, 0] != labels[0, 8]
    one = np.ones((4, 4), bool)
    one[:, 2] = False                # already 1 px wide: stays
    assert np.array_equal(M.thin(one) == 0, ~one)


def test_perfect_prediction_scores_perfectly_and_everything_cell_badly():
    rng = np.random.default_rng(0)
    gt = np.ones((40, 40), bool)
    gt[::10, :] = False
    gt[:, ::13] = False
    prob = np.where(gt, 0.95, 0.05) + rng.uniform(-0.04, 0.04, gt.shape)
    s = M.isbi_scores([prob, prob], [gt, gt])
    assert s["pixel_error"] == 0 and s["rand_error"] == pytest.approx(0, abs=1e-12)
    assert s["v_rand"] == pytest.approx(1.0) and s["v_info"] == pytest.approx(1.0)
    everything = M.isbi_scores([np.ones(gt.shape)], [gt])
    frac = gt.mean()   # 'everything is cell': precision = frac, recall 1
    assert everything["pixel_error"] == pytest.approx(1 - 2 * frac / (1 + frac))
    assert everything["v_rand"] < 0.5


def test_thresholds_are_fijis():
    assert len(M.PIXEL_THRESHOLDS) == 10 and M.PIXEL_THRESHOLDS[-1] == pytest.approx(0.9)
    assert len(M.THINNED_THRESHOLDS) == 11 and M.THINNED_THRESHOLDS[-1] < 1.0


def test_v_scores_average_per_slice_and_counts_add_up_over_slices():
    """V_rand / V_info: the best threshold of the per-slice mean; pixel and Rand error: the
    F-score of counts summed over slices (Fiji's micro average), not a mean of errors."""
    rng = np.random.default_rng(1)
    gts, probs = [], []
    for k in range(2):
        gt = np.ones((24, 24), bool)
        gt[:, 7 + 5 * k] = gt[11, :] = False
        gts.append(gt)
        probs.append(np.clip(gt * 0.7 + rng.uniform(0, 0.5, gt.shape), 0, 1))
    per = [M.slice_stats(p, g) for p, g in zip(probs, gts)]
    got = M.isbi_scores(probs, gts)
    assert got["v_rand"] == pytest.approx(max((per[0][:, 6] + per[1][:, 6]) / 2))
    assert got["v_info"] == pytest.approx(max((per[0][:, 7] + per[1][:, 7]) / 2))
    total = per[0] + per[1]
    best_f = max(M._fscore(*row[:3]) for row in total[:10])
    assert got["pixel_error"] == pytest.approx(1 - best_f)
