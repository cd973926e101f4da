"""TempFlow-GRPO: trajectory branching with stochasticity localisation and noise-aware weighting.

Paper: He, Fu et al. 2025, "TempFlow-GRPO: When Timing Matters for GRPO in Flow Models", arXiv
2508.04324 (trajectory branching: an ODE root, one SDE step at each branch point, ODE
continuation, so each branch's reward credits that one step; noise-aware policy weighting; group
advantages among the branches of the same root and branch point). Code form as in the RSM
repository's ``sd35_zeroth_order`` (``reweight: tempflow``: the Flow-GRPO PPO term × 2.25·σ̃√Δt;
profile ``base``: k = 6 branches at each of the 9 transitions), derivations §8.9, §9.4–9.5.
Table 1 row: "TempFlow-GRPO" (branching: Yes). Digest §7.2, §8.9.
Equivalence kind: ``grad_at_behaviour``: exact at θ = θ† (ρ = 1, clip inactive) on the branch
rows, same x_t and ξ in both losses, terminal reward of each branch's leaf.

Rollout (``rsmbench.core.tree.localised_tree``): ODE root x_0..x_N per seed; at each transition i with
k_i > 0, k_i children restart from x_i, take the Flow-GRPO SDE step (Eq. 9 of arXiv 2505.05470,
the process's SDE table) and continue with Euler-ODE steps. One training row per branch: its SDE
transition. NFE per root = N + Σk_i + Σk_i(N − i − 1) (derivations §9.5).

The RSM code's ppo path with ``reweight tempflow`` on its branch sampler (jaylee2000/rsm@e8be3df
``sd35_zeroth_order/scripts/train_sd3_pr.py``:1621-1696; ``flow_grpo/sd3_train_shared.py``:153-154), as
this file follows it: rows with A = 0 masked (all kept when every A is 0, :1444-1446); every row's
policy and KL terms weighted by kw = k_avg/k_i (:1640-1645, :1678, :1689; 1 for the uniform profiles);
KL = ⟨Δμ²⟩/(2σ̃²) with the heuristic denominator (``heuristic_kldenom_trick`` True, ``config/sd3_matrix.py``:132,
every reward but geneval), ⟨Δμ²⟩/(2σ̃²Δt) without (:1682-1688); β from the reward preset
(``config/sd3_reward_presets.py``:10,32: 0.01, geneval 0.004 with the trick off :165). TempFlow-GRPO's
own code is unreleased (Shredded-Pork/TempFlow-GRPO@afe6d33 README), so the RSM reimplementation is the
reference.

Original (per branch row, mean over the kept rows, ⟨·⟩ per-element means; A standardised among siblings):
    ρ = exp(⟨log p_θ⟩ − ⟨log p_θ†⟩),
    L = kw·[2.25·σ̃_i√Δt_i · max(−A·ρ, −A·clip(ρ, 1 ± ε)) + β·KL_i(θ‖ref)]
RSM instance (first-step gradient A·2.25·c_tΔt·⟨ξ·∂v⟩, derivations §5.3):
    Ψ̂/a = −A·ξ/(β'·w_t) (likelihood ratio), γ = 2.25·σ̃√Δt = κ_t/w_t, C1·a² = kw·β'·w_t²/2, C2 = 0,
    anchor s_ref if β > 0 (β' = β, ×Δt with the heuristic denominator) else s_θ† (β' = 1).
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import nonzero_advantage_mask
from rsmbench.core.method import Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec, elementwise_mean
from rsmbench.core.tree import GROUP_STRATEGIES, localised_tree, node_advantages, to_batch


@register
class TempFlowGRPO(Method):
    id = "tempflow_grpo"
    processes = ("flow",)
    published_processes = ("flow",)  # SD3.5-M / FLUX.1-dev (arXiv 2508.04324 §5; Shredded-Pork/TempFlow-GRPO README)
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ, one SDE step + ODE continuation, seed groups',
                 "gamma": '2.25·σ̃√Δt / w^b (noise-aware)', "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": 'PPO clip',
                 "branching": True, "current_state": False}
    paper = ("TempFlow-GRPO: He, Fu et al. 2025, arXiv 2508.04324 (trajectory branching, noise-aware "
             "weighting); Flow-GRPO SDE: arXiv 2505.05470, Eq. 9; derivations §8.9")
    table1 = "TempFlow-GRPO"
    kind_reason = "θ = θ† (ρ = 1, clip inactive), same x_t and ξ, terminal reward per branch leaf"
    defaults = {"k": hp([2, 2, 2, 2, 2, 2, 2], items=hp(0, ge=0)), "noise_scale": hp(2.25, gt=0),
                "clip_range": hp(1e-4, gt=0), "beta": hp(0.0, ge=0), "heuristic_kldenom": True,
                "adv_clip_max": hp(5.0, gt=0, null=True), "adv_eps": hp(1e-4, gt=0),
                "group_strategy": hp("seed", choices=GROUP_STRATEGIES), "mask_zero": True}
    strength = "beta"  # the KL weight; default 0: the RSM repo's presets use 0.01 (rsm_base) and
    strength_grid = (0.0, 0.004, 0.01, 0.04)  # 0.004 (geneval), with one step beyond
    influence_preset = {"flow": "rsm_base"}
    presets = {
        "rsm_base": {"k": [6] * 9, "noise_scale": 2.25, "clip_range": 1e-4, "beta": 0.01, "heuristic_kldenom": True,
                     "adv_clip_max": 5.0, "group_strategy": "seed",
                     "source": "jaylee2000/rsm@e8be3df sd35_zeroth_order run_sd3.sh --profile base --sampler branch "
                               "--loss ppo --reweight tempflow (pickscore and the other non-geneval rewards): "
                               "config/sd3_matrix.py:57,177,192 (k [6]×10, timestep_fraction 0.99: 9 branching "
                               "steps of N = 10, group_strategy seed), :132 (heuristic_kldenom_trick True), "
                               "config/sd3_reward_presets.py:10 (beta 0.01), config/base.py:96-98; "
                               "derivations §8.9, §9.4"},
        "rsm_base_geneval": {"k": [6] * 9, "noise_scale": 2.25, "clip_range": 1e-4, "beta": 0.004,
                             "heuristic_kldenom": False, "adv_clip_max": 5.0, "group_strategy": "seed",
                             "source": "jaylee2000/rsm@e8be3df run_sd3.sh --profile base --sampler branch --reward "
                                       "geneval --loss ppo --reweight tempflow: config/sd3_reward_presets.py:32 (beta "
                                       "0.004), :165 (heuristic_kldenom_trick False); otherwise as rsm_base"},
    }

    def collect(self, ctx, cond, seeds):
        tree = localised_tree(ctx.behaviour, ctx.shape, cond, list(seeds), ctx.hp["k"], dtype=_dtype(ctx))
        return to_batch(tree, ctx.reward)

    def prepare(self, batch, ctx):
        tree, leaves, hp = batch.extras["tree"], batch.extras["leaves"], ctx.hp
        adv = node_advantages(tree, batch.rewards, leaves, tree.start[leaves], hp["group_strategy"], hp["adv_eps"],
                              hp["adv_clip_max"])
        batch.extras["advantages"] = adv
        if hp["mask_zero"]:
            batch.rows = batch.rows.select(nonzero_advantage_mask(batch.rows, adv))
        k = torch.tensor(tree.extras["k"])
        batch.row_data["row_weight"] = weights.branch_count_weight(
            k[batch.rows.step], k[k > 0].double().mean().item()).to(batch.rows.x.dtype)

    def _kl_beta(self, ctx, rows):
        """β per row: β·Δt_i with the heuristic denominator (⟨Δμ²⟩/(2σ̃²) = Δt·the Gaussian KL)."""
        beta = ctx.hp["beta"]
        return beta * ctx.process.dt[rows.step].to(rows.x.dtype) if ctx.hp["heuristic_kldenom"] else beta

    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        A = batch.extras["advantages"][rows.sample]
        kw = batch.row_data["row_weight"]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        mu = p.mean(rows.x, out, rows.step)
        log_ratio = p.log_prob(rows.x_next, mu, rows.step) - rows.log_prob
        batch.extras["stats"] = trust.ppo_stats(log_ratio, hp["clip_range"])
        noise_weight = hp["noise_scale"] * p.std(rows.step).to(out.dtype)  # 2.25·σ̃√Δt
        loss = noise_weight * trust.ppo_clip(torch.exp(log_ratio), A, hp["clip_range"])
        if hp["beta"] > 0:
            with torch.no_grad():
                mu_ref = p.mean(rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.step)
            if hp["heuristic_kldenom"]:  # train_sd3_pr.py:1682-1683: ⟨Δμ²⟩/(2σ̃²)
                kl = elementwise_mean((mu - mu_ref) ** 2) / (2 * p.sigma_tilde[rows.step].to(mu.dtype) ** 2)
            else:
                kl = p.kl(mu, mu_ref, rows.step)
            loss = loss + hp["beta"] * kl
        return (kw * loss).mean()

    def rsm_spec(self, batch, ctx):
        rows, p, beta = batch.rows, ctx.process, ctx.hp["beta"]
        A = batch.extras["advantages"][rows.sample]
        kw = batch.row_data["row_weight"]
        b = self._kl_beta(ctx, rows) if beta > 0 else 1.0
        kappa = weights.kappa_noise_aware(p, rows, ctx.hp["noise_scale"])
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(p, rows, A, b),
                       gamma=weights.relative_gamma(p, rows, kappa), c1=kw * weights.kl_natural(p, rows, b),
                       c2=torch.zeros(len(rows)), anchor="ref" if beta > 0 else "behaviour")
