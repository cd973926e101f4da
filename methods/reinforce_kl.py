"""REINFORCE with a per-step KL regulariser (the DPOK-style policy gradient without a value net).

Paper: policy gradient with per-step KL to the pretrained model, as in DPOK (Fan et al. 2023,
arXiv 2305.16381, Eq. 8 with the Gaussian KL of Lemma 4.1 / Eq. 10); REINFORCE (Williams 1992).
Table 1 row: "REINFORCE + KL reg" (RSM, arXiv 2604.17415; derivations §7.2, §8.4).
Equivalence kind: ``grad_at_behaviour``. Exact at θ = θ† when the samples are on-policy, the KL
is the closed-form per-step Gaussian KL, the reward is terminal, and both losses see the same
x_t and ξ. Off-policy (θ ≠ θ†) the REINFORCE term is an A-weighted matching loss around θ†,
while RSM puts A inside the target: they agree only in gradient at θ†.

Original (per row = sample × step, mean over rows):
    L = −α·A·⟨log p_θ(x'|x)⟩ + β·KL(p_θ(·|x) ‖ p_ref(·|x)),   A = r − mean_group(r),  α = reward_weight
RSM instance:
    Ψ̂ = (σ/(βΩ))·α·A·ξ,  γ = 1,  C1 = β·Ω²/(2σ²),  C2 = 0,  anchor s_ref.
Preset ``dpok``: α = 10, β = 0.01, the values of DPOK's single-prompt command (google-research
``dpok/README.md``@83282e4: ``--reward_weight 10 --kl_weight 0.01``); the KL:reward ratio is 1e-3 as
there. DPOK's own code puts its kl_weight on an unweighted ε-MSE, not on this row's Gaussian KL
(see ``methods/dpok.py``), so the same β weighs the two KLs differently: this row is the Table-1
REINFORCE + KL method with DPOK's coefficients, not DPOK's code.
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, weights
from rsmbench.core.advantages import group_advantages
from rsmbench.core.method import Method, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec


@register
class ReinforceKL(Method):
    id = "reinforce_kl"
    processes = ("diffusion", "flow")
    published_processes = ("diffusion",)  # DPOK's REINFORCE + KL on SD1.5 (arXiv 2305.16381 §5)
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/(βΩ))·A·ξ, A = r − mean', "gamma": '1', "c1": 'β·Ω²/(2σ²)', "c2": '0',
                 "branching": False, "current_state": False}
    paper = "DPOK: Fan et al. 2023, arXiv 2305.16381, Eq. 8 and Eq. 10 (per-step KL); derivations §8.4"
    table1 = "REINFORCE + KL reg"
    kind_reason = "on-policy, closed-form per-step KL, terminal reward, same x_t and ξ in both losses"
    defaults = {"beta": hp(0.01, gt=0),  # > 0: Ψ̂ ∝ 1/β (KL-free: grpo with beta 0)
                "reward_weight": hp(1.0, gt=0), "normalize_advantage": False,
                "baseline": hp("mean", choices=("mean", "none"))}
    strength = "beta"  # the KL weight
    influence_preset = {"diffusion": "dpok", "flow": "dpok"}
    presets = {
        "dpok": {"beta": 0.01, "reward_weight": 10.0, "normalize_advantage": False,
                 "source": "google-research/google-research dpok/README.md@83282e4 (--reward_weight 10 "
                           "--kl_weight 0.01)"},
    }

    def prepare(self, batch, ctx):
        """A = r − mean_prompt(r) (control variate, derivations §4.2), optionally / std; or raw r."""
        if ctx.hp["baseline"] == "none":
            adv = batch.rewards.clone()
        elif ctx.hp["baseline"] == "mean":
            groups = None if batch.cond is None else batch.cond
            adv = group_advantages(batch.rewards, groups, normalize=ctx.hp["normalize_advantage"])
        else:
            raise ValueError(f"baseline must be 'mean' or 'none', got {ctx.hp['baseline']!r}")
        batch.extras["advantages"] = adv  # per sample

    def original_loss(self, batch, ctx):
        rows, p = batch.rows, ctx.process
        A = batch.extras["advantages"][rows.sample]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        mu = p.mean(rows.x, out, rows.step)
        logp = p.log_prob(rows.x_next, mu, rows.step)
        with torch.no_grad():
            mu_ref = p.mean(rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.step)
        kl = p.kl(mu, mu_ref, rows.step)
        return (-ctx.hp["reward_weight"] * A * logp + ctx.hp["beta"] * kl).mean()

    def rsm_spec(self, batch, ctx):
        rows, beta = batch.rows, ctx.hp["beta"]
        A = ctx.hp["reward_weight"] * batch.extras["advantages"][rows.sample]
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(ctx.process, rows, A, beta),
                       gamma=torch.ones(len(rows)), c1=weights.kl_natural(ctx.process, rows, beta),
                       c2=torch.zeros(len(rows)), anchor="ref")
