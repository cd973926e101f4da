"""RSM-ZO: the RSM paper's zeroth-order redesigns ("Ours", diffusion §9.3 and flow §9.4).

Paper: Lee, Chang, Kim, Ye 2026, "Reward Score Matching", arXiv 2604.17415; code jaylee2000/rsm
(``sd15_zeroth_order/train_grpo_pr.py`` with ``base_grpo_pr_uwsigma_lora10.yaml``; ``sd35_zeroth_order``
``run_sd3.sh --profile lowsnr2 --sampler branch --loss matching --reweight fairclip2``). Digest §6,
§9.3–9.5. Not a Table 1 row (the paper's redesign; digest §9.3, §9.4).
Equivalence kind: ``grad_at_behaviour``: exact at θ = θ† (matching clip inactive: ε|A| > 0 on every
kept row), same x_t and ξ; the KL terms (branch-row SDE KL, ODE KL anchors) are loss identities.

Rollout (``rsmbench.core.tree.localised_tree``): deterministic root (DDIM η = 0 / Euler ODE); at each
transition i with k_i > 0 (the low-SNR end), k_i one-step SDE branches (DDPM σ / Flow-GRPO SDE)
continued by the ODE; NFE per root N + Σk_i + Σk_i(N − i − 1) (digest §9.5). Advantages
standardised per group (diffusion: (prompt, branch step); flow: (root seed, branch step)), std +
1e-4, clipped ±5; rows with A = 0 (zero-std groups) are masked. ODE KL-anchor rows: root states at
zero-k non-final transitions, ⌊anchor_frac·#branch rows⌋ of them.

Original (per row, ONE mean over branch + anchor rows, ⟨·⟩ per-element means, kw = k_avg/k_i;
Δo = o_θ − o_θ†, w_t = −B/σ the sampler weight, σ_s = step std):
  diffusion (PCPO-reweight matching loss, κ = w/s = 4.5/8.70575):
    term = ½⟨(κ·Δε)²⟩ + ⟨κ·Δε·ξ⟩,   L_row = kw·max(0, ε|A| + A·term)
  flow (fair clip, −log ρ̂ = ½w_t²⟨Δv²⟩ + w_t⟨Δv·ξ⟩ exact Gaussian):
    L_row = kw·[max(0, ε|A| + A·(−log ρ̂)·σ_s²)/σ_s² · σ̃/√Δt + β·KL_t(θ‖ref)]
  anchor rows: L_row = β_anchor·KL_t(θ‖ref) at the root state (SDE-step means, σ of step t)
RSM instance:
  branch rows: Ψ̂/a = −A·ξ/(β'·w_t), γ = κ_t/w_t (κ = w/s resp. c_t), C1·a² = kw·β'·w_t²/2, C2 = 0,
               anchor s_ref if β > 0 (β' = β) else s_θ† (β' = 1);
  anchor rows: Ψ̂ = 0, γ = 1, C1·a² = β_anchor·w_t²/2, anchor s_ref.
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.method import Method, _dtype, register
from rsmbench.core.rsm import RSMSpec, elementwise_mean
from rsmbench.core.tree import cat_rows, kl_anchor_rows, localised_tree, node_advantages, to_batch

# Per-process settings where the two redesigns differ (hp value None → this table).
PROCESS_DEFAULTS = {
    "diffusion": {"beta": 0.0, "anchor_beta": 8e-5, "group_strategy": "prompt"},
    "flow": {"beta": 0.004, "anchor_beta": 0.004, "group_strategy": "seed"},
}


@register
class RSMZeroOrder(Method):
    id = "rsm_zo"
    processes = ("diffusion", "flow")
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ on branch steps of a deterministic root',
                 "gamma": 'const 4.5/8.706 (diffusion) / c_t (flow) over w_t',
                 "c1": 'Ω²/(2σ²)·k_avg/k, anchor s_θ†; ODE KL anchor rows β', "c2": 'PCPO / fair clip',
                 "branching": True, "current_state": False}
    paper = ("RSM: Lee, Chang, Kim, Ye 2026, arXiv 2604.17415, zeroth-order redesigns; code jaylee2000/rsm "
             "(train_grpo_pr.py, sd3 lowsnr2 fairclip2); digest §6, §9.3-9.5")
    table1 = "not a Table 1 row (the paper's zeroth-order redesigns, digest §9.3, §9.4)"
    kind_reason = ("θ = θ† (matching / fair clip inactive), same x_t and ξ; KL anchors and branch-row KL are "
                   "loss identities")
    defaults = {"k": [3, 2, 3, 2], "clip_range": 1e-4, "adv_clip_max": 5.0, "adv_eps": 1e-4,
                "const_weight": 4.5, "weight_scale": 8.70575, "beta": None, "anchor_beta": None,
                "anchor_frac": 0.1, "group_strategy": None, "mask_zero": True}
    presets = {
        "sd15_ours": {"k": [4 if i % 10 == 0 else 0 for i in range(50)], "const_weight": 4.5,
                      "weight_scale": 8.70575, "beta": 0.0, "anchor_beta": 8e-5, "anchor_frac": 0.1,
                      "group_strategy": "prompt", "clip_range": 1e-4, "adv_clip_max": 5.0,
                      "source": "jaylee2000/rsm sd15_zeroth_order configs/train/base_grpo_pr_uwsigma_lora10.yaml "
                                "(ddim_branching at steps 0/10/20/30/40, k = 4, const_weight 4.5, "
                                "weight_scale_factor 8.70575, use_ode_kl_anchor 8e-5; digest §9.3)"},
        "sd35_lowsnr2": {"k": [6, 6, 8, 10, 0, 0, 0, 0, 0, 0], "beta": 0.004, "anchor_beta": 0.004,
                         "anchor_frac": 0.1, "group_strategy": "seed", "clip_range": 1e-4, "adv_clip_max": 5.0,
                         "source": "jaylee2000/rsm run_sd3.sh --profile lowsnr2 --sampler branch --loss matching "
                                   "--reweight fairclip2 (config sd3.lowsnr2.branch.geneval.matching.fairclip2; "
                                   "digest §9.4)"},
    }

    def _hp(self, ctx, name):
        v = ctx.hp[name]
        return PROCESS_DEFAULTS[ctx.process.kind][name] if v is None else v

    # ---- rollout and advantages (shared by both formulations) ------------------------------------
    def collect(self, ctx, cond, seeds):
        tree = localised_tree(ctx.behaviour, ctx.shape, cond, list(seeds), ctx.hp["k"], dtype=_dtype(ctx))
        return to_batch(tree, ctx.reward, seeds=list(seeds))

    def prepare(self, batch, ctx):
        tree, leaves, hp = batch.extras["tree"], batch.extras["leaves"], ctx.hp
        adv = node_advantages(tree, batch.rewards, leaves, tree.start[leaves], self._hp(ctx, "group_strategy"),
                              hp["adv_eps"], hp["adv_clip_max"])
        rows = batch.rows
        if hp["mask_zero"]:
            rows = rows.select(adv[rows.sample] != 0)
            if len(rows) == 0:
                raise ValueError("rsm_zo: every branch group has zero reward spread (all A = 0); "
                                 "use more branches per group or set mask_zero=False")
        k = torch.tensor(tree.extras["k"])
        kw = weights.branch_count_weight(k[rows.step], k[k > 0].double().mean().item()).to(rows.x.dtype)
        anchors = kl_anchor_rows(tree, hp["anchor_frac"], len(rows), seed=sum(batch.extras["seeds"]))
        n_a = 0 if anchors is None else len(anchors)
        batch.rows = rows if anchors is None else cat_rows([rows, anchors])
        batch.extras["advantages"] = adv
        batch.row_data["row_weight"] = torch.cat([kw, torch.zeros(n_a, dtype=kw.dtype)])
        batch.row_data["kl_anchor"] = torch.cat([torch.zeros(len(rows), dtype=torch.bool),
                                               torch.ones(n_a, dtype=torch.bool)])

    # ---- original ------------------------------------------------------------------------------------
    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        is_a, kw = batch.row_data["kl_anchor"], batch.row_data["row_weight"]
        br, an = rows.select(~is_a), rows.select(is_a)
        A = batch.extras["advantages"][br.sample]
        out = ctx.policy(br.x, br.step, br.cond)
        dout = out - br.out_behaviour
        d = lambda v: v.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))  # noqa: E731
        eps = hp["clip_range"]
        if p.kind == "diffusion":  # PCPO matching term with the constant weight κ = w/s
            kappa = hp["const_weight"] / hp["weight_scale"]
            term = elementwise_mean(0.5 * (kappa * dout) ** 2 + kappa * dout * br.noise)
            loss = trust.matching_clip(term, A, eps)
            step_var = 1.0
        else:  # fair clip on the exact Gaussian −log ρ̂, rescaled by σ̃/√Δt
            w = p.weight(br.step).to(out.dtype)
            term = elementwise_mean(0.5 * (d(w) * dout) ** 2 + d(w) * dout * br.noise)
            step_var = (p.std(br.step) ** 2).to(out.dtype)
            scale = (p.sigma_tilde[br.step] / torch.sqrt(p.dt[br.step])).to(out.dtype)
            loss = trust.fair_matching_clip(term, A, step_var, eps) * scale
        beta = self._hp(ctx, "beta")
        if beta > 0:
            loss = loss + beta * self._kl(ctx, br, out)
        rows_loss = [kw[~is_a] * loss]
        if len(an):
            rows_loss.append(self._hp(ctx, "anchor_beta") * self._kl(ctx, an, ctx.policy(an.x, an.step, an.cond)))
        batch.extras["stats"] = {"clipfrac": trust.matching_clipfrac(term, A, eps, step_var),
                                 "approx_kl": 0.5 * (term.detach() ** 2).mean().item(), "anchor_rows": len(an)}
        return torch.cat(rows_loss).mean()

    @staticmethod
    def _kl(ctx, rows, out):
        """Per-row KL_t(θ‖ref) of the SDE step from the row's state (σ of step t), ⟨·⟩ per element."""
        p = ctx.process
        with torch.no_grad():
            mu_ref = p.mean(rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.step, stochastic=True)
        return p.kl(p.mean(rows.x, out, rows.step, stochastic=True), mu_ref, rows.step)

    # ---- RSM instance ----------------------------------------------------------------------------------
    def rsm_spec(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        is_a, kw = batch.row_data["kl_anchor"], batch.row_data["row_weight"]
        beta = self._hp(ctx, "beta")
        b = beta if beta > 0 else 1.0
        A = torch.where(is_a, 0.0, batch.extras["advantages"][rows.sample])
        if p.kind == "diffusion":
            kappa = torch.full((len(rows),), hp["const_weight"] / hp["weight_scale"], dtype=rows.x.dtype)
        else:
            kappa = weights.kappa_guard(p, rows)
        gamma = torch.where(is_a, 1.0, weights.relative_gamma(p, rows, kappa))
        c1 = torch.where(is_a, weights.kl_natural(p, rows, self._hp(ctx, "anchor_beta")),
                         kw * weights.kl_natural(p, rows, b))
        anchor = is_a | (beta > 0)
        anchor = "ref" if anchor.all() else ("behaviour" if not anchor.any() else anchor)
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(p, rows, A, b), gamma=gamma, c1=c1,
                       c2=torch.zeros(len(rows)), anchor=anchor)
