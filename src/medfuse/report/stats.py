"""Paired statistics over the test pairs of one modality pair (the summary, mean ± std, is
`medfuse.metrics.evaluate.mean_std`)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def rank_biserial(differences: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (Kerby, 2014), the effect size of Wilcoxon's test.

    (sum of ranks of positive differences - sum for negative ones) / total rank sum, in [-1, 1];
    zero differences are dropped, as in Wilcoxon's own statistic.
    """
    d = differences[np.isfinite(differences) & (differences != 0)]
    if d.size == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def paired_test(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Wilcoxon signed-rank test of `ours - reference` over the same test pairs, two-sided.

    Returns the p-value (NaN when every difference is zero or fewer than two pairs remain),
    the rank-biserial effect size and the median difference.
    """
    ours, reference = np.asarray(ours, float), np.asarray(reference, float)
    if ours.shape != reference.shape:
        raise ValueError(f"paired samples differ in length: {ours.shape} vs {reference.shape}")
    diff = ours - reference
    keep = np.isfinite(diff)
    p_value = float("nan")
    if np.count_nonzero(diff[keep]) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # small-sample/ties notices
            p_value = float(stats.wilcoxon(diff[keep], zero_method="wilcox").pvalue)
    return {
        "p_value": p_value,
        "effect_size": rank_biserial(diff[keep]),
        "median_diff": float(np.median(diff[keep])) if keep.any() else float("nan"),
        "n": int(keep.sum()),
    }
