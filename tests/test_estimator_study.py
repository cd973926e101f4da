"""Estimator study on gmm: the qualitative claims of derivations §4.2–4.3 hold on the exact-score
rollouts at tiny sample counts (8 points, n ≤ 256), and every panel runs and plots."""

import numpy as np
import pytest
import torch

from rsmbench.data import gmm
from rsmbench.harness import estimator_study as es

LOG2_N = (4, 6, 8)


@pytest.fixture(scope="module")
def setting():
    return es.Setting(n_points=8)


@pytest.fixture(scope="module")
def samples(setting):
    return [r for r in es.panel_samples(setting, "exact", LOG2_N)]


def _series(rows, name):
    got = sorted((r["n_samples"], r["rmse"]) for r in rows if r["estimator"] == name)
    return np.array([v for _, v in got])


def test_setting_is_the_toy_operating_point(setting):
    assert setting.process.timesteps[setting.i] == 651 and abs(setting.alphabar - 0.0134) < 1e-4
    # the exact-score net returns −√(1−ᾱ)·∇log p_t of the reference mixture
    x = setting.points
    eps = setting.models["exact"](x, setting.i, None)
    sc, ns = gmm.marginal_coeffs(setting.process, setting.i)
    torch.testing.assert_close(eps, -ns * setting.truth.ref.affine(sc, ns).score(x), rtol=1e-12, atol=1e-12)


def test_zeroth_order_rmse_falls_with_samples(samples):
    for name in ("ZO w/o control variate", "ZO w/ control variate"):
        r = _series(samples, name)
        assert r[-1] < 0.6 * r[0], (name, r)  # 16× the samples: ≈ 4× lower variance part


def test_control_variate_lowers_rmse_at_equal_samples(samples):
    assert np.all(_series(samples, "ZO w/ control variate") < _series(samples, "ZO w/o control variate"))


def test_first_order_current_state_is_biased(samples):
    r = _series(samples, "FO current-state (DPS)")
    assert len(r) == len(LOG2_N) and np.all(r == r[0])  # deterministic: no fall with samples
    assert r[0] > 0.05  # a bias well above float error (exact ε, exact Ψ)


def test_every_panel_runs_and_plots(setting, samples, tmp_path):
    rows = samples + es.panel_lookahead(setting, "exact", 16) + es.panel_branching(setting, "exact", (8, 9)) \
        + es.panel_localization(setting, "exact", (4, 5), 64)
    df = __import__("pandas").DataFrame(rows)
    assert set(df.panel) == {"samples", "lookahead", "branching", "localization"}
    assert np.isfinite(df.rmse).all() and (df.rmse > 0).all()
    br = df[df.panel == "branching"]
    assert br.estimator.nunique() == len(es.BRANCH_CONFIGS) and (br.nfe <= 2**9).all()
    la = df[df.panel == "lookahead"]
    assert la.depth.max() == setting.process.num_steps - setting.i  # down to the final sample
    # the localised sampler is closer to its own reference than to the exact Ψ (it estimates another quantity)
    loc = df[(df.panel == "localization") & df.estimator.str.startswith("SDE at t")]
    assert set(loc.estimator) == {"SDE at t, then ODE vs exact Ψ", "SDE at t, then ODE vs own reference"}
    paths = es.plot(df, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)
    cap = es.caption(dict(step=setting.i, timestep=651, alphabar=setting.alphabar, n_points=8, log2_n=LOG2_N,
                          model_note="x", seconds=1.0))
    assert "RMSE" in cap and "0.0134" in cap


def test_doob_floor_and_tilted_weights(samples):
    """The exact one-step Doob target sits close to Ψ_t (discretisation only) and below every estimate;
    the self-normalised exp-tilted weights approach it faster than the linear control variate."""
    floor = _series(samples, "exact one-step Doob target (floor)")
    assert np.all(floor == floor[0]) and floor[0] < 0.06
    for name in ("ZO w/ control variate", "ZO exp-tilted weights", "FO current-state (DPS)"):
        assert np.all(_series(samples, name) > floor[0]), name
    assert _series(samples, "ZO exp-tilted weights")[-1] < _series(samples, "ZO w/ control variate")[-1]
