"""Bootstrap confidence intervals over questions and training seeds (two-level, percentile).

``scores`` is a ``[seeds, items]`` array of per-item results (0/1 correctness, or any per-item metric)
where every seed (an independently trained model) answered the SAME items. One bootstrap replicate draws
seeds with replacement and, independently, items with replacement, and takes the mean over the drawn
cells; the interval is the (alpha/2, 1 - alpha/2) percentiles of the replicates. This counts both sources
of variation a reader cares about: which questions were asked and which training run was drawn. With one
seed only the items are resampled (the seed spread is then unknown, and the interval too narrow).

``diff_ci(a, b)`` is the same for the difference of two arms' means; the items are drawn once for both
(paired: both arms answered the same items), the seeds of each arm independently.
"""

from __future__ import annotations

import numpy as np


def _as_2d(scores) -> np.ndarray:
    x = np.asarray(scores, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"scores must be [seeds, items] with at least one of each, got shape {x.shape}")
    return x


def _replicates(x: np.ndarray, items: np.ndarray, rng) -> np.ndarray:
    """Means over resampled seeds for each row of resampled ``items`` [n_boot, n_items]."""
    s = x.shape[0]
    seeds = rng.integers(0, s, size=(items.shape[0], s))
    # mean over drawn seeds of the mean over drawn items: per-seed item means first
    per_seed = x[:, items].mean(-1)  # [s, n_boot]
    return np.take_along_axis(per_seed.T, seeds, axis=1).mean(-1)


def mean_ci(scores, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """{"mean", "lo", "hi", "n_seeds", "n_items"} of ``scores`` [seeds, items]."""
    x = _as_2d(scores)
    rng = np.random.default_rng(seed)
    items = rng.integers(0, x.shape[1], size=(n_boot, x.shape[1]))
    reps = _replicates(x, items, rng)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return dict(mean=float(x.mean()), lo=float(lo), hi=float(hi), n_seeds=int(x.shape[0]), n_items=int(x.shape[1]))


def diff_ci(a, b, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Interval of mean(a) - mean(b) for two arms scored on the same items ([seeds_a, n], [seeds_b, n])."""
    xa, xb = _as_2d(a), _as_2d(b)
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"both arms must be scored on the same items, got {xa.shape[1]} and {xb.shape[1]}")
    rng = np.random.default_rng(seed)
    items = rng.integers(0, xa.shape[1], size=(n_boot, xa.shape[1]))
    reps = _replicates(xa, items, rng) - _replicates(xb, items, rng)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return dict(diff=float(xa.mean() - xb.mean()), lo=float(lo), hi=float(hi))
