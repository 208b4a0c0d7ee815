"""How far the binned AUC of `unet_jax.fov_metrics` is from the exact AUC, and what it costs.

Run:
    python experiments/studies/fov_auc_bins.py [--pixels 4000000] [--seed 0]
Expected runtime: about 15 s on a 2-core CPU.

Score distributions: vessel-probability maps as a trained vessel segmenter produces them, in
log-odds z = logit_vessel - logit_background (float32 softmax of (0, z), as the evaluator
computes it), 12 % vessel pixels (DRIVE's share inside the FOV):
  "trained":  background 85 % N(-9, 2), 12 % N(-4, 2) (beside vessels), 3 % N(0, 2.5) (lesions,
              vessel borders); vessels 70 % N(6, 2.5) (wide), 20 % N(1, 2.5) (thin), 10 %
              N(-3, 2.5) (missed capillaries). AUC ~0.986, like published DRIVE models.
  "confident": the same z times 3: many probabilities saturate at exactly 0 or 1 in float32
              (ties), the rest sit at 1e-30 .. 1e-3 from 1 or 0.
  "tta":      the mean of 12 "trained" views with per-view noise N(0, 1) in z (averaged
              probabilities, as `eval.tta` gives).
  "weak":     a barely trained model: background N(-1, 1), vessels N(0, 1) (AUC ~0.76).
For each: the exact AUC (ranks, ties averaged: Mann-Whitney U), the binned AUC with the
library's bins (float32 bits of min(p, 1 - p), BIN_SHIFT 12, 516k bins), their difference and
the guaranteed bound (half the share of pairs sharing a bin), and, for comparison, the binned
AUC over 2**16 and 2**20 bins uniform in p. Then the cost of `fov_counts_jnp` on one HRF-sized
image (3504 x 2336).

Measured (seed 0, 4 M pixels, 2-core CPU), |binned - exact| AUC in [0, 1] units:
             exact     library  its bound  uniform 2**16  uniform 2**20
  trained    0.985537  4.5e-09  1.1e-06    1.1e-06        5.1e-08
  confident  0.985492  2.2e-10  8.9e-05    1.7e-02        9.8e-03
  tta        0.985288  3.9e-09  1.3e-06    6.3e-07        9.3e-09
  weak       0.760036  4.6e-08  5.5e-05    1.7e-09        7.0e-11
The library's error is 5e-8 or less, and even its guaranteed bound stays under the 1e-4 budget
(0.01 AUC points). Uniform bins fail for the confident model (1.7e-2 with 2**16 bins, 9.8e-3
with 2**20: its background and its missed vessels share the first bin). The "confident" bound is
the largest because it counts exact ties too (pixels saturated at p = 0 or 1, which the exact
AUC counts as ties as well). fov_counts_jnp on a 3504 x 2336 image: 0.18 s on the 2-core CPU
(small next to the slide inference of such an image: ~300 windows of 256 x 256), 3.9 MB of
counts to the host.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import fov_metrics as FM


def exact_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney U with average ranks for ties."""
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = avg_rank[inverse]
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def uniform_auc(scores: np.ndarray, positive: np.ndarray, bins: int) -> float:
    idx = np.clip((scores.astype(np.float64) * bins).astype(np.int64), 0, bins - 1)
    pos = np.bincount(idx[positive], minlength=bins).astype(np.float64)
    neg = np.bincount(idx[~positive], minlength=bins).astype(np.float64)
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + neg / 2)) / (pos.sum() * neg.sum()))


def mixture(rng: np.random.Generator, n: int, parts: list[tuple[float, float, float]]
            ) -> np.ndarray:
    which = rng.choice(len(parts), size=n, p=[w for w, _, _ in parts])
    means = np.array([m for _, m, _ in parts])[which]
    stds = np.array([s for _, _, s in parts])[which]
    return rng.normal(means, stds)


def vessel_prob(z: np.ndarray) -> np.ndarray:
    """float32 softmax of logits (0, z), channel 1: what the evaluator sees."""
    logits = jnp.stack([jnp.zeros(z.shape, jnp.float32), jnp.asarray(z, jnp.float32)], -1)
    return np.asarray(jax.nn.softmax(logits, axis=-1)[..., 1])


def distributions(rng: np.random.Generator, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    positive = rng.random(n) < 0.12
    background = [(0.85, -9.0, 2.0), (0.12, -4.0, 2.0), (0.03, 0.0, 2.5)]
    vessel = [(0.70, 6.0, 2.5), (0.20, 1.0, 2.5), (0.10, -3.0, 2.5)]
    z = np.where(positive, mixture(rng, n, vessel), mixture(rng, n, background))
    tta = np.mean([vessel_prob(z + rng.normal(0, 1, n)) for _ in range(12)], axis=0)
    weak = np.where(positive, rng.normal(0, 1, n), rng.normal(-1, 1, n))
    return {"trained": (vessel_prob(z), positive), "confident": (vessel_prob(3 * z), positive),
            "tta": (tta.astype(np.float32), positive), "weak": (vessel_prob(weak), positive)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    ones = np.ones(args.pixels, np.uint8)
    for name, (prob, positive) in distributions(rng, args.pixels).items():
        acc = FM.FovAccumulator()
        acc.add(prob, prob > 0.5, positive.astype(np.uint8), ones)
        exact = exact_auc(prob, positive)
        print(f"{name:10s} exact {exact:.6f}  |library - exact| {abs(acc.auc() - exact):.1e}  "
              f"bound {acc.auc_error_bound():.1e}  uniform 2**16 "
              f"{abs(uniform_auc(prob, positive, 2**16) - exact):.1e}, 2**20 "
              f"{abs(uniform_auc(prob, positive, 2**20) - exact):.1e}")
    h, w = 3504, 2336
    prob = jnp.asarray(rng.random((h, w), np.float32))
    label = jnp.asarray((rng.random((h, w)) < 0.1).astype(np.uint8))
    fov = jnp.ones((h, w), jnp.uint8)
    count = jax.jit(FM.fov_counts_jnp)
    jax.block_until_ready(count(prob, prob > 0.5, label, fov))
    start = time.perf_counter()
    for _ in range(3):
        out = count(prob, prob > 0.5, label, fov)
        np.asarray(out[1])
    print(f"fov_counts_jnp on {h} x {w}: {(time.perf_counter() - start) / 3:.2f} s per image, "
          f"{out[1].size * 4 / 2**20:.1f} MB of counts")


if __name__ == "__main__":
    main()
