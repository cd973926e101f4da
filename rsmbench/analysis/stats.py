"""Interval estimates over seeds (rliable's recommendations: Agarwal et al. 2021, arXiv 2108.13264).

- ``iqm``: interquartile mean, the mean of the middle 50 % of runs (scipy.stats.trim_mean at 25 %).
- ``bootstrap_ci``: percentile bootstrap confidence interval of a statistic over runs
  (scipy.stats.bootstrap), *stratified* by task when several tasks are pooled: runs are resampled
  with replacement within each task, and the statistic is applied to the pooled resample.
- ``mean_ci``: mean ± Student-t half-width, for small seed counts in summary tables.

Every function takes plain arrays of per-run scores and a seeded RNG, so results are reproducible.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def iqm(scores) -> float:
    """Interquartile mean: scipy.stats.trim_mean with 25 % cut from each end."""
    return float(stats.trim_mean(np.asarray(scores, dtype=float), 0.25))


STATISTICS = {"mean": np.mean, "iqm": iqm, "median": np.median}


def bootstrap_ci(scores, statistic: str = "mean", confidence: float = 0.95, n_resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high) for one stratum: scipy.stats.bootstrap, percentile method."""
    x = np.asarray(scores, dtype=float)
    fn = STATISTICS[statistic]
    point = float(fn(x))
    if len(x) < 2 or np.all(x == x[0]):
        return point, point, point
    res = stats.bootstrap((x,), lambda s, axis=-1: np.apply_along_axis(fn, axis, s), vectorized=True,
                          confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                          rng=np.random.default_rng(seed))
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def stratified_bootstrap_ci(scores_by_task: dict, statistic: str = "mean", confidence: float = 0.95,
                            n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high) of the statistic over runs pooled across tasks, resampling runs within
    each task (stratified bootstrap, as rliable's ``get_interval_estimates``)."""
    fn = STATISTICS[statistic]
    strata = [np.asarray(v, dtype=float) for v in scores_by_task.values()]
    point = float(fn(np.concatenate(strata)))
    rng = np.random.default_rng(seed)
    draws = np.empty(n_resamples)
    for b in range(n_resamples):
        draws[b] = fn(np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata]))
    alpha = (1 - confidence) / 2
    return point, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def mean_ci(scores, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of a Student-t interval; half-width 0 for a single run."""
    x = np.asarray(scores, dtype=float)
    if len(x) < 2:
        return float(x.mean()), 0.0
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(half)
