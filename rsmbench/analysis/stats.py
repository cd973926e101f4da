"""Interval estimates over runs, following rliable (Agarwal et al. 2021, arXiv 2108.13264; code
google-research/rliable ``library.py``, ``rliable/metrics.py``). The one statistics path of the suite:
the bench summary, the report and the claims all call these functions, with the same seeds.

Scores are given per task as arrays of per-run (per-seed) values, ``{task: (n_runs,)}``.

- ``iqm``: interquartile mean, the mean of the middle 50 % of the pooled runs
  (scipy.stats.trim_mean at 25 %, rliable's ``aggregate_iqm``).
- ``interval``: point estimate and 95 % stratified-bootstrap percentile CI of an aggregate (IQM by
  default): runs are resampled with replacement within each task, and the aggregate is applied to the
  pooled resample (rliable's ``StratifiedBootstrap`` with ``task_bootstrap=False``, method
  ``percentile``). For one task this is the plain percentile bootstrap over seeds.
- ``probability_of_improvement``: P(X > Y) = the Mann–Whitney U statistic / (n_x·n_y) per task (ties
  count ½; identical samples give ½), averaged over tasks (rliable's ``probability_of_improvement``),
  with a CI from resampling X's and Y's runs independently within each task
  (rliable's ``StratifiedIndependentBootstrap``).
- ``difference``: mean(X) − mean(Y) with a CI from resampling X's and Y's runs independently
  (within each task).
- ``paired_difference``: the change from the base model of a per-sample score, averaged over strata, with a CI
  over seeds and eval samples both (the pigeonhole bootstrap of a crossed design, Owen 2007).
- ``performance_profile``: the fraction of runs (pooled over tasks) whose normalised score exceeds τ,
  with its CI (rliable's ``create_performance_profile``, score distributions).
- ``smallest_detectable``: the smallest difference of means a two-sample comparison at these seed
  counts detects with 80 % power at the 5 % level (normal approximation), the power statement of an
  inconclusive verdict.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 20_000
SEED = 0


def iqm(scores) -> float:
    """Interquartile mean of the pooled scores (25 % cut from each end)."""
    return float(stats.trim_mean(np.asarray(scores, dtype=float).ravel(), 0.25))


AGGREGATES = {"iqm": iqm, "mean": lambda x: float(np.mean(x)), "median": lambda x: float(np.median(x))}


def _strata(scores) -> list[np.ndarray]:
    if isinstance(scores, dict):
        return [np.asarray(v, dtype=float).ravel() for v in scores.values()]
    return [np.asarray(scores, dtype=float).ravel()]


def _resample(strata, n: int, rng) -> list[np.ndarray]:
    """n stratified resamples of each stratum: a list of (n, len(stratum)) arrays."""
    return [s[rng.integers(0, len(s), size=(n, len(s)))] for s in strata]


def interval(scores, aggregate: str = "iqm", confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES,
             seed: int = SEED) -> tuple[float, float, float]:
    """(point, low, high): the aggregate over all runs and its stratified-bootstrap percentile CI.
    `scores`: per-run values of one task, or {task: per-run values}."""
    strata = _strata(scores)
    fn = AGGREGATES[aggregate]
    point = fn(np.concatenate(strata))
    if sum(len(s) for s in strata) < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    draws = np.concatenate(_resample(strata, n_resamples, rng), axis=1)
    if aggregate == "iqm":
        vals = stats.trim_mean(draws, 0.25, axis=1)
    elif aggregate == "mean":
        vals = draws.mean(axis=1)
    else:
        vals = np.median(draws, axis=1)
    a = (1 - confidence) / 2
    return point, float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def _poi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) per resample: x (n, a), y (n, b) → (n,), ties ½."""
    gt = (x[:, :, None] > y[:, None, :]).mean(axis=(1, 2))
    eq = (x[:, :, None] == y[:, None, :]).mean(axis=(1, 2))
    return gt + 0.5 * eq


def probability_of_improvement(x, y, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES,
                               seed: int = SEED) -> tuple[float, float, float]:
    """(P(X > Y), low, high), averaged over tasks; `x`, `y` as in ``interval`` (same tasks)."""
    sx, sy = _strata(x), _strata(y)
    if len(sx) != len(sy):
        raise ValueError("x and y must cover the same tasks")
    point = float(np.mean([_poi(a[None], b[None])[0] for a, b in zip(sx, sy)]))
    rng = np.random.default_rng(seed)
    per_task = [_poi(a, b) for a, b in zip(_resample(sx, n_resamples, rng), _resample(sy, n_resamples, rng))]
    vals = np.mean(per_task, axis=0)
    a = (1 - confidence) / 2
    return point, float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def difference(x, y, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES,
               seed: int = SEED) -> tuple[float, float, float]:
    """(mean(X) − mean(Y), low, high): pooled over tasks, runs resampled independently within each task."""
    sx, sy = _strata(x), _strata(y)
    point = float(np.concatenate(sx).mean() - np.concatenate(sy).mean())
    rng = np.random.default_rng(seed)
    dx = np.concatenate(_resample(sx, n_resamples, rng), axis=1).mean(axis=1)
    dy = np.concatenate(_resample(sy, n_resamples, rng), axis=1).mean(axis=1)
    a = (1 - confidence) / 2
    return point, float(np.quantile(dx - dy, a)), float(np.quantile(dx - dy, 1 - a))


def paired_difference(final, base, strata, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES,
                      seed: int = SEED) -> tuple[float, float, float]:
    """(D, low, high): D = mean over strata of the mean over seeds and samples of final − base, with a CI
    that covers both the seeds and the eval samples.

    `final`, `base`: (seeds, samples) per-sample scores of each seed's final and iteration-0 evals on the same
    eval samples (prompts and noise seeds), `strata`: each sample's stratum (shapes: its GenEval category, so D
    is the change of the logged macro accuracy). Seeds and samples are crossed (every seed is scored on the same
    samples), so both are resampled independently, samples within their stratum: the pigeonhole bootstrap (Owen
    2007, Ann. Appl. Stat. 1(2), 386–411), percentile CI. Pairing each sample with its base counterpart removes
    the samples' shared difficulty; resampling them adds the eval's own sampling error, which a CI over seeds
    alone leaves out."""
    f, b = np.asarray(final, dtype=float), np.asarray(base, dtype=float)
    labels = np.asarray(strata)
    if f.ndim != 2 or f.shape != b.shape or f.shape[1] != len(labels):
        raise ValueError(f"final {f.shape} and base {b.shape} must be (seeds, samples) over {len(labels)} samples")
    d = f - b
    groups = [d[:, labels == c] for c in dict.fromkeys(labels.tolist())]
    point = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    n_seeds = d.shape[0]
    w = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_resamples)  # seed counts (R, S)
    vals = np.zeros(n_resamples)
    for g in groups:
        u = rng.multinomial(g.shape[1], np.full(g.shape[1], 1 / g.shape[1]), size=n_resamples)  # sample counts
        vals += np.einsum("rs,si,ri->r", w, g, u) / (n_seeds * g.shape[1])
    vals /= len(groups)
    a = (1 - confidence) / 2
    return point, float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def performance_profile(scores, taus, confidence: float = CONFIDENCE, n_resamples: int = 2000,
                        seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(profile, low, high) over `taus`: the fraction of runs whose (normalised) score exceeds τ."""
    strata, taus = _strata(scores), np.asarray(taus, dtype=float)
    pooled = np.concatenate(strata)
    profile = (pooled[:, None] > taus[None]).mean(axis=0)
    rng = np.random.default_rng(seed)
    draws = np.concatenate(_resample(strata, n_resamples, rng), axis=1)  # (n, runs)
    vals = (draws[:, :, None] > taus[None, None]).mean(axis=1)
    a = (1 - confidence) / 2
    return profile, np.quantile(vals, a, axis=0), np.quantile(vals, 1 - a, axis=0)


def smallest_detectable(sd_x: float, n_x: int, sd_y: float, n_y: int, alpha: float = 0.05,
                        power: float = 0.8) -> float:
    """The smallest difference of means detectable at level `alpha` with `power` by a two-sided
    two-sample comparison (normal approximation): (z_{1−α/2} + z_power)·√(s_x²/n_x + s_y²/n_y)."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(z * np.sqrt(sd_x**2 / max(n_x, 1) + sd_y**2 / max(n_y, 1)))
