"""Every registered method × process: the two formulations agree at θ = θ† (float64), and each
check fails when a deliberately wrong constant is injected into the RSM instance."""
import pytest
import torch

from rsmbench.core.method import load_all
from rsmbench.harness import equivalence

REG = load_all()
PAIRS = [(m, p) for m in sorted(REG) for p in REG[m].processes]
EXACT_PAIRS = [(m, p) for m, p in PAIRS if REG[m].kind in equivalence.EXACT]


@pytest.mark.parametrize("method,process", PAIRS)
def test_formulations_agree_at_behaviour(method, process):
    rec = equivalence.check(method, process, "float64", offpolicy_steps=0)
    if rec.kind in equivalence.EXACT:
        assert rec.max_rel_err <= 1e-9, rec
        assert abs(rec.cosine - 1) <= 1e-9
        assert rec.passed
    else:  # approximate: the gap is reported, finite, and the gradients still point the same way
        assert rec.max_rel_err < float("inf") and rec.cosine > 0


def _sign(spec, ctx):
    spec.psi = -spec.psi
    return spec


def _factor_two(spec, ctx):  # a dropped constant 2 (e.g. the ½ of the Gaussian KL)
    spec.c1 = spec.c1 * 2
    return spec


def _sum_vs_mean(spec, ctx):  # ‖·‖² summed over D elements instead of averaged
    spec.c1 = spec.c1 * spec.rows.x[0].numel()
    return spec


def _dropped_weight(spec, ctx):  # a per-step factor (w_t) dropped from Ψ̂
    w = ctx.process.weight(spec.rows.step).to(spec.psi.dtype)
    spec.psi = spec.psi * w.reshape(-1, *([1] * (spec.psi.dim() - 1)))
    return spec


@pytest.mark.parametrize("perturb", [_sign, _factor_two, _sum_vs_mean, _dropped_weight])
@pytest.mark.parametrize("method,process", EXACT_PAIRS)
def test_injected_error_is_detected(method, process, perturb):
    rec = equivalence.check(method, process, "float64", perturb=perturb, offpolicy_steps=0)
    assert not rec.passed and rec.max_rel_err > 1e-6, rec


def test_offpolicy_series_starts_exact_and_drifts():
    rec = equivalence.check("reinforce_kl", "diffusion", "float64", offpolicy_steps=3)
    errs = [s["max_rel_err"] for s in rec.offpolicy]
    assert errs[0] <= 1e-9 and errs[-1] > 1e-6 and [s["step"] for s in rec.offpolicy] == [0, 1, 2, 3]


def test_float32_check_uses_its_tolerance():
    rec = equivalence.check("reinforce_kl", "flow", "float32", offpolicy_steps=0)
    assert rec.passed and rec.max_rel_err <= equivalence.TOL["float32"]
    assert isinstance(rec.max_rel_err, float) and torch.get_default_dtype() == torch.float32
