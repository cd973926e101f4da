"""Statistics against hand-computed values on fixed data."""

import numpy as np
import pytest
from scipy import stats as sps

from rsmbench.analysis.stats import (
    difference,
    interval,
    iqm,
    performance_profile,
    probability_of_improvement,
    smallest_detectable,
)


def test_iqm_hand_computed():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == 4.5  # middle four: 3, 4, 5, 6
    assert iqm([10, 1, 2, 3, 4, 5, 6, 7, 8, 100]) == pytest.approx((3 + 4 + 5 + 6 + 7 + 8) / 6)  # cuts 2 per end


def test_interval_two_point_distribution():
    # resampled means of [0, 1] are 0, ½, 1 with probabilities ¼, ½, ¼: the 95 % percentile CI is [0, 1]
    assert interval([0.0, 1.0], "mean", n_resamples=20_000, seed=1) == (0.5, 0.0, 1.0)
    # 90 % CI of the mean of [0, 0, 0, 1]: P(mean = 0) = (3/4)^4 = 0.316 > 5 %, so the lower end is 0,
    # and P(mean ≥ ¾) = 13/256 = 5.08 % > 5 %, so the upper end is ¾
    assert interval([0, 0, 0, 1], "mean", confidence=0.9, n_resamples=20_000, seed=2) == (0.25, 0.0, 0.75)
    assert interval([3.0], "iqm") == (3.0, 3.0, 3.0)


def test_interval_is_stratified_by_task():
    data = {"a": [0.0, 1.0], "b": [10.0, 10.0]}
    # task b never varies, task a's runs resample to {0,0}, {0,1}, {1,1}: pooled mean ∈ {5, 5.25, 5.5}
    assert interval(data, "mean", n_resamples=20_000, seed=3) == (5.25, 5.0, 5.5)
    # an unstratified bootstrap of the four pooled values would reach 2.5 (three 0/1 draws and a 10)
    x = np.random.default_rng(0).normal(size=30)
    p1, l1, h1 = interval({"only": x}, "iqm", seed=4)
    p2, l2, h2 = interval(x, "iqm", seed=4)
    assert (p1, l1, h1) == (p2, l2, h2) and l1 < p1 < h1


def test_probability_of_improvement_hand_computed():
    assert probability_of_improvement([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])[0] == 1.0
    assert probability_of_improvement([1.0, 2.0], [1.0, 2.0])[0] == 0.5
    # pairs (0 vs 1): <, (2 vs 1): >, so ½; with a tie (1 vs 1) counting ½: (0 + 1 + ½)/3
    assert probability_of_improvement([0.0, 2.0], [1.0])[0] == 0.5
    assert probability_of_improvement([0.0, 1.0, 2.0], [1.0])[0] == pytest.approx(0.5)
    assert probability_of_improvement([0.0, 1.0, 3.0], [1.0, 2.0])[0] == pytest.approx((0 + 0 + .5 + 0 + 1 + 1) / 6)
    # two tasks: the task probabilities (1 and 0) are averaged
    assert probability_of_improvement({"a": [2.0], "b": [0.0]}, {"a": [1.0], "b": [1.0]})[0] == 0.5


def test_probability_of_improvement_equals_mann_whitney_u():
    rng = np.random.default_rng(5)
    x, y = rng.normal(0.3, 1, 7), rng.normal(0, 1, 5)
    u = sps.mannwhitneyu(x, y, alternative="greater").statistic
    point, lo, hi = probability_of_improvement(x, y, seed=6)
    assert point == pytest.approx(u / (7 * 5), abs=1e-12) and 0 <= lo <= point <= hi <= 1


def test_performance_profile_hand_computed():
    prof, lo, hi = performance_profile({"a": [0.0, 1.0], "b": [2.0, 3.0]}, [-1.0, 0.5, 2.5, 4.0], seed=7)
    assert prof.tolist() == [1.0, 0.75, 0.25, 0.0]
    assert lo[0] == hi[0] == 1.0 and lo[-1] == hi[-1] == 0.0 and (lo <= prof).all() and (prof <= hi).all()


def test_smallest_detectable_difference():
    # (1.96 + 0.8416)·√(1/3 + 1/3) with unit standard deviations and 3 seeds each
    assert smallest_detectable(1.0, 3, 1.0, 3) == pytest.approx((1.959964 + 0.841621) * (2 / 3) ** 0.5, rel=1e-5)


def test_frechet_nuclear_norm_form_equals_sqrtm_formula():
    """The SVD form of Tr (C1·C2)^½ used by the evaluator equals scipy's sqrtm formula."""
    import torch
    from scipy import linalg

    from rsmbench.run.evaluate import frechet

    rng = np.random.default_rng(1)
    for n1, n2, d in ((40, 30, 5), (20, 25, 64)):  # n > d and n < d
        a, b = rng.normal(size=(n1, d)), rng.normal(loc=0.3, size=(n2, d)) @ rng.normal(size=(d, d)) * 0.5
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
        assert frechet(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-8, abs=1e-8)


def test_difference_of_means_hand_computed():
    # X ∈ {1, 3} resamples to means {1, 2, 3} (¼, ½, ¼); Y = {0, 0} never varies: the difference's 95 % CI is [1, 3]
    assert difference([1.0, 3.0], [0.0, 0.0], n_resamples=20_000, seed=8) == (2.0, 1.0, 3.0)
    point, lo, hi = difference({"a": [1.0, 1.0], "b": [2.0, 2.0]}, {"a": [0.0, 0.0], "b": [0.0, 0.0]})
    assert (point, lo, hi) == (1.5, 1.5, 1.5)
