"""The RSM loss: native-space form equals the score-space definition; C2 has zero gradient at θ†."""
import torch

from rsmbench.core.rollout import generators, sample
from rsmbench.core.rsm import RSMSpec, rsm_loss, rsm_loss_rows, to_native, to_score
from tests.helpers import tiny_policy


def _rows(kind):
    pol, beh = tiny_policy(kind, cfg_scale=1.5)
    ref, _ = tiny_policy(kind, seed=5, cfg_scale=1.5)
    ro = sample(beh, (2,), generators(range(3)), cond=torch.tensor([0, 1, 1]), dtype=torch.float64)
    rows = ro.transitions()
    if kind == "flow":  # drop t = 1, where the score does not depend on v
        rows = rows.select(rows.step > 0)
    return pol, ref, rows


def test_native_loss_equals_score_space_loss():
    for kind in ("diffusion", "flow"):
        pol, ref, rows = _rows(kind)
        p, R = pol.process, len(rows)
        g = torch.Generator().manual_seed(3)
        c1, c2 = torch.rand(R, generator=g, dtype=torch.float64), torch.rand(R, generator=g, dtype=torch.float64)
        gamma = torch.rand(R, generator=g, dtype=torch.float64)
        psi = torch.randn(rows.x.shape, generator=g, dtype=torch.float64)
        a = p.score_a[rows.step]
        c1n, psin, c2n = to_native(a, c1, psi, c2)
        spec = RSMSpec(rows=rows, psi=psin, gamma=gamma, c1=c1n, c2=c2n, anchor="ref")
        o, o_ref = pol(rows.x, rows.step, rows.cond), ref(rows.x, rows.step, rows.cond)
        s, s_ref = p.to_score(rows.x, o, rows.step), p.to_score(rows.x, o_ref, rows.step)
        s_beh = p.to_score(rows.x, rows.out_behaviour, rows.step)
        direct = c1 * ((s - s_ref - gamma[:, None] * psi) ** 2).mean(1) + c2 * ((s - s_beh) ** 2).mean(1)
        torch.testing.assert_close(rsm_loss_rows(o, o_ref, spec), direct, rtol=1e-11, atol=1e-12)
        back = to_score(a, c1n, psin, c2n)
        torch.testing.assert_close(back[1], psi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rsm_loss(pol, ref, spec), direct.mean(), rtol=1e-11, atol=1e-12)


def test_trust_region_term_has_zero_gradient_at_behaviour_and_not_after():
    pol, ref, rows = _rows("diffusion")
    R = len(rows)
    spec = RSMSpec(rows=rows, psi=torch.zeros_like(rows.x), gamma=torch.ones(R), c1=torch.zeros(R),
                   c2=torch.ones(R), anchor="ref")
    params = list(pol.net.parameters())
    g = torch.autograd.grad(rsm_loss(pol, ref, spec), params)
    assert max(x.abs().max().item() for x in g) < 1e-14  # o_θ† was computed at another batch size
    with torch.no_grad():
        params[0].add_(0.01)
    g = torch.autograd.grad(rsm_loss(pol, ref, spec), params)
    assert max(x.abs().max().item() for x in g) > 1e-6


def test_minimiser_is_the_weighted_target():
    """Per row, argmin_o C1‖o−(o_ref+γΨ̂)‖² + C2‖o−o†‖² = (C1(o_ref+γΨ̂) + C2 o†)/(C1+C2) (derivations §3.3)."""
    pol, ref, rows = _rows("flow")
    R = len(rows)
    c1, c2 = torch.full((R,), 0.3, dtype=torch.float64), torch.full((R,), 0.7, dtype=torch.float64)
    psi = torch.ones_like(rows.x)
    spec = RSMSpec(rows=rows, psi=psi, gamma=torch.full((R,), 2.0), c1=c1, c2=c2, anchor="ref")
    o_ref = ref(rows.x, rows.step, rows.cond)
    best = (0.3 * (o_ref + 2 * psi) + 0.7 * rows.out_behaviour) / 1.0
    o = best.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(rsm_loss_rows(o, o_ref, spec).sum(), o)
    assert gr.abs().max() < 1e-12
