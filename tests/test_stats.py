"""Statistics against hand-computed values on fixed data."""
import math

import numpy as np
import pytest

from rsmbench.analysis.stats import bootstrap_ci, iqm, mean_ci, stratified_bootstrap_ci


def test_iqm_hand_computed():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == 4.5  # middle four: 3, 4, 5, 6
    assert iqm([10, 1, 2, 3, 4, 5, 6, 7, 8, 100]) == pytest.approx((3 + 4 + 5 + 6 + 7 + 8) / 6)  # cuts 2 per end


def test_mean_ci_student_t():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    assert mean_ci([5.0]) == (5.0, 0.0)


def test_bootstrap_two_point_distribution():
    # resampled means of [0, 1] are 0, ½, 1 with probabilities ¼, ½, ¼: the 95 % percentile CI is [0, 1]
    point, lo, hi = bootstrap_ci([0.0, 1.0], n_resamples=20_000, seed=1)
    assert (point, lo, hi) == (0.5, 0.0, 1.0)
    # 90 % CI of [0, 0, 0, 1]: P(mean = 0) = (3/4)^4 = 0.316 > 5 %, so the lower end is 0
    point, lo, hi = bootstrap_ci([0, 0, 0, 1], confidence=0.9, n_resamples=20_000, seed=2)
    # and P(mean ≥ ¾) = 13/256 = 5.08 % > 5 %, so the upper end is ¾
    assert point == 0.25 and lo == 0.0 and hi == 0.75


def test_stratified_bootstrap_keeps_strata_and_matches_plain_for_one_task():
    data = {"a": [0.0, 1.0], "b": [10.0, 10.0]}
    point, lo, hi = stratified_bootstrap_ci(data, n_resamples=20_000, seed=3)
    # task b never varies, task a's mean takes 0, ½, 1: pooled mean ∈ {5, 5.25, 5.5}
    assert point == 5.25 and lo == 5.0 and hi == 5.5
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    p1, l1, h1 = stratified_bootstrap_ci({"only": x}, n_resamples=20_000, seed=4)
    p2, l2, h2 = bootstrap_ci(x, n_resamples=20_000, seed=5)
    assert p1 == p2 and abs(l1 - l2) < 0.05 and abs(h1 - h2) < 0.05


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
