"""RSM-ZO: the RSM paper's zeroth-order redesigns ("Ours", diffusion §9.3 and flow §9.4).

Paper: Lee, Chang, Kim, Ye 2026, "Reward Score Matching", arXiv 2604.17415; derivations §6, §9.3–9.5. Not a
Table 1 row (the paper's redesign; derivations §9.3, §9.4). Code: jaylee2000/rsm@e8be3df:
  diffusion ``sd15_zeroth_order/train_grpo_pr.py`` with ``configs/train/base_grpo_pr_uwsigma_lora10.yaml``;
  flow ``sd35_zeroth_order/scripts/train_sd3_pr.py`` with ``run_sd3.sh --profile lowsnr2 --sampler branch
  --reward geneval --loss matching --reweight fairclip2``.
Equivalence kind: ``grad_at_behaviour``: exact at θ = θ† (matching clip inactive: ε|A| > 0 on every
kept row), same x_t and ξ; the KL terms (branch-row SDE KL, ODE KL anchors) are loss identities.

Rollout (``rsmbench.core.tree.localised_tree``): deterministic root (DDIM η = 0 / Euler ODE); at each
transition i with k_i > 0 (the low-SNR end), k_i one-step SDE branches (DDPM σ / Flow-GRPO SDE)
continued by the ODE; NFE per root N + Σk_i + Σk_i(N − i − 1) (derivations §9.5). Advantages
standardised per group (diffusion: (prompt, branch step); flow: (root seed, branch step)), std +
1e-4, clipped ±5; rows with A = 0 (zero-std groups) are masked, all rows kept when every A is 0
(train_sd3_pr.py:1444-1446, train_grpo_pr.py:1646-1648). kw = k_avg/k_i, k_avg the mean k over the
branching transitions (train_sd3_pr.py:154-161, :1640-1645).
ODE KL-anchor rows (``tree.kl_anchor_rows``): the root states at the zero-k, non-final transitions:
  flow: all of them (``collection_batch_size × num_zero_train_timesteps``, train_sd3_pr.py:613-617;
    5 per root for lowsnr2), only when β > 0 (:1796-1800);
  diffusion: at most ⌊anchor_row_max_ratio·#branch rows⌋ (0.10), at least 1, of them, a random
    subset (train_grpo_pr.py:1652-1668; #branch rows before masking).
Original, with separate means over the branch rows b and the anchor rows a (⟨·⟩ per-element means;
Δo = o_θ − o_θ†, w_t = −B/σ the sampler weight, σ_s = σ̃√Δt the step std):
  diffusion (train_grpo_pr.py:2003-2039, :2094-2125; PCPO-reweight matching, κ = w/s = 4.5/8.70575076181):
    L = mean_b kw·max(0, ε|A| + A·(½⟨(κΔε)²⟩ + ⟨κΔε·ξ⟩)) + β_a·mean_a ½·c²·⟨(ε_θ − ε_ref)²⟩,
    c = const_weight = 4.5 (``kl_weight_t``, not the DDPM w_t; w_t when const_weight is None), β_a = 8e-5
  flow (train_sd3_pr.py:1719-1782, :1851-1882; fair clip on the exact Gaussian −log ρ̂ = ½w_t²⟨Δv²⟩ + w_t⟨Δv·ξ⟩):
    L = mean_b kw·[max(0, ε|A| + A·(−log ρ̂)·σ_s²)/σ_s² · σ̃/√Δt + β·KL_t] + β·k_avg·mean_a KL_t(root state),
    KL_t = ⟨Δμ²⟩/(2σ̃²Δt) (``heuristic_kldenom_trick`` False, the geneval setting; True: /(2σ̃²))
  Both means are realised as one mean over all R = n_b + n_a rows with per-row weights R/n_b, R/n_a
  (``row_weight``), so a loss over a chunk of rows, weighted by its share, sums to the batch loss.
RSM instance (native units, the same row weights in C1):
  branch rows: Ψ̂/a = −A·ξ/(β'·w_t), γ = κ_t/w_t (κ = w/s resp. c_t), C1·a² = (R/n_b)·kw·β'·w_t²/2, C2 = 0,
               anchor s_ref if β > 0 (β' = β, ×Δt with the heuristic denominator) else s_θ† (β' = 1);
  anchor rows: Ψ̂ = 0, γ = 1, C1·a² = (R/n_a)·β_a·c²/2 (diffusion), (R/n_a)·β·k_avg·w_t²/2 (flow), anchor s_ref.
Deliberate deviation: the SD1.5 code draws its branch steps with the uw-sigma root σ (``_get_std``,
``diffusion/ddim_step.py``:34-50); here the process's DDPM σ (derivations §8.6). The code spreads the
anchor rows over its micro-batches and averages per micro-batch; here one mean per batch.
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import nonzero_advantage_mask
from rsmbench.core.method import Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec, elementwise_mean
from rsmbench.core.tree import GROUP_STRATEGIES, cat_rows, kl_anchor_rows, localised_tree, node_advantages, to_batch
from rsmbench.errors import TaskError

# Per-process settings where the two redesigns differ (hp value None → this table). Flow's anchor
# coefficient is β·k_avg (train_sd3_pr.py:1866-1882): ``anchor_beta`` None there means β.
PROCESS_DEFAULTS = {
    "diffusion": {"beta": 0.0, "anchor_beta": 8e-5, "anchor_ratio": 0.10, "group_strategy": "prompt"},
    "flow": {"beta": 0.004, "anchor_beta": None, "anchor_ratio": "all", "group_strategy": "seed"},
}


@register
class RSMZeroOrder(Method):
    id = "rsm_zo"
    processes = ("diffusion", "flow")
    # the paper's zeroth-order redesigns run on both: SD1.5 (derivations §9.3, jaylee2000/rsm@e8be3df
    # sd15_zeroth_order) and SD3.5-M (§9.4, sd35_zeroth_order)
    published_processes = ("diffusion", "flow")
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A·ξ on branch steps of a deterministic root',
                 "gamma": 'const 4.5/8.706 (diffusion) / c_t (flow) over w_t',
                 "c1": 'Ω²/(2σ²)·k_avg/k, anchor s_θ†; ODE KL anchor rows β', "c2": 'PCPO / fair clip',
                 "branching": True, "current_state": False}
    paper = ("RSM: Lee, Chang, Kim, Ye 2026, arXiv 2604.17415, zeroth-order redesigns; code jaylee2000/rsm "
             "(train_grpo_pr.py, sd3 lowsnr2 fairclip2); derivations §6, §9.3-9.5")
    table1 = "not a Table 1 row (the paper's zeroth-order redesigns, derivations §9.3, §9.4)"
    kind_reason = ("θ = θ† (matching / fair clip inactive), same x_t and ξ; KL anchors and branch-row KL are "
                   "loss identities")
    # None: the process's PROCESS_DEFAULTS value
    defaults = {"k": hp([3, 2, 3, 2], items=hp(0, ge=0)), "clip_range": hp(1e-4, gt=0),
                "adv_clip_max": hp(5.0, gt=0, null=True), "adv_eps": hp(1e-4, gt=0),
                "const_weight": hp(4.5, gt=0, null=True),  # None: the DDPM w_t
                "weight_scale": hp(8.70575076181, gt=0), "beta": hp(None, type=float, ge=0),
                "anchor_beta": hp(None, type=float, ge=0), "use_ode_kl_anchor": True,
                "anchor_ratio": hp(None, type=float, ge=0, le=1, extra=("all",)), "heuristic_kldenom": False,
                "group_strategy": hp(None, choices=GROUP_STRATEGIES, null=True), "mask_zero": True}
    strength = "clip_range"  # the matching / fair clip ε (β differs per process: PROCESS_DEFAULTS)
    influence_preset = {"diffusion": "sd15_ours", "flow": "sd35_lowsnr2"}

    def check_hparams(self, hp):
        if not any(int(v) > 0 for v in hp["k"]):
            raise TaskError(f"k must branch at some step (an entry > 0), got {hp['k']}")
    presets = {
        "sd15_ours": {"k": [4 if i % 10 == 0 else 0 for i in range(50)], "const_weight": 4.5,
                      "weight_scale": 8.70575076181, "beta": 0.0, "anchor_beta": 8e-5, "anchor_ratio": 0.10,
                      "use_ode_kl_anchor": True, "group_strategy": "prompt", "clip_range": 1e-4,
                      "adv_clip_max": 5.0,
                      "source": "jaylee2000/rsm@e8be3df sd15_zeroth_order/configs/train/"
                                "base_grpo_pr_uwsigma_lora10.yaml (exploration_k 4 at steps 0/10/20/30/40, "
                                "const_weight 4.5, weight_scale_factor 8.70575076181, group_strategy prompt, "
                                "use_ode_kl_anchor true, ode_kl_anchor_beta 0.00008, anchor_row_max_ratio 0.10, "
                                "train_clip_range 1e-4, train_adv_clip_max 5.0); derivations §9.3"},
        "sd35_lowsnr2": {"k": [6, 6, 8, 10, 0, 0, 0, 0, 0, 0], "beta": 0.004, "anchor_beta": None,
                         "anchor_ratio": "all", "use_ode_kl_anchor": True, "heuristic_kldenom": False,
                         "group_strategy": "seed", "clip_range": 1e-4, "adv_clip_max": 5.0,
                         "source": "jaylee2000/rsm@e8be3df sd35_zeroth_order run_sd3.sh --profile lowsnr2 --sampler "
                                   "branch --reward geneval --loss matching --reweight fairclip2: "
                                   "config/sd3_matrix.py:62 (exploration_k [6,6,8,10,0,0,0,0,0,6], the last entry "
                                   "outside timestep_fraction 0.99 :177), :192 (group_strategy seed), "
                                   "config/sd3_reward_presets.py:32,165-166 (beta 0.004, heuristic_kldenom_trick "
                                   "False, use_ode_kl_anchor True), config/base.py:96-98 (adv_clip_max 5, "
                                   "clip_range 1e-4); derivations §9.4"},
    }

    def _hp(self, ctx, name):
        v = ctx.hp[name]
        return PROCESS_DEFAULTS[ctx.process.kind][name] if v is None else v

    # ---- rollout and advantages (shared by both formulations) ------------------------------------
    def collect(self, ctx, cond, seeds):
        tree = localised_tree(ctx.behaviour, ctx.shape, cond, list(seeds), ctx.hp["k"], dtype=_dtype(ctx))
        return to_batch(tree, ctx.reward, seeds=list(seeds))

    def prepare(self, batch, ctx):
        tree, leaves, hp, p = batch.extras["tree"], batch.extras["leaves"], ctx.hp, ctx.process
        if p.kind == "diffusion" and hp["heuristic_kldenom"]:
            raise ValueError("rsm_zo: heuristic_kldenom applies to the flow process only")
        adv = node_advantages(tree, batch.rewards, leaves, tree.start[leaves], self._hp(ctx, "group_strategy"),
                              hp["adv_eps"], hp["adv_clip_max"])
        rows = batch.rows
        n_total = len(rows)  # every branch row, before masking (the SD1.5 anchor cap counts them)
        if hp["mask_zero"]:
            rows = rows.select(nonzero_advantage_mask(rows, adv))
        k = torch.tensor(tree.extras["k"])
        k_avg = k[k > 0].double().mean().item()
        kw = weights.branch_count_weight(k[rows.step], k_avg).to(rows.x.dtype)
        anchors = self._anchors(tree, ctx, n_total, seed=sum(batch.extras["seeds"]))
        n_b, n_a = len(rows), 0 if anchors is None else len(anchors)
        R = n_b + n_a
        batch.rows = rows if anchors is None else cat_rows([rows, anchors])
        batch.extras["advantages"] = adv
        batch.extras["k_avg"] = k_avg
        # separate means over branch and anchor rows, as one mean over all R rows (see the docstring)
        batch.row_data["row_weight"] = torch.cat([kw * (R / n_b) if n_b else kw,
                                                  torch.full((n_a,), R / max(n_a, 1), dtype=kw.dtype)])
        batch.row_data["kl_anchor"] = torch.cat([torch.zeros(n_b, dtype=torch.bool), torch.ones(n_a, dtype=torch.bool)])

    def _anchors(self, tree, ctx, n_total: int, seed: int):
        """The ODE KL-anchor rows: none without ``use_ode_kl_anchor`` (or, in flow, with β = 0); all zero-k
        transitions (``anchor_ratio`` "all"), or ⌊ratio·n_total⌋ of them, at least 1 (SD1.5)."""
        ratio = self._hp(ctx, "anchor_ratio")
        if not ctx.hp["use_ode_kl_anchor"] or (ctx.process.kind == "flow" and self._hp(ctx, "beta") <= 0):
            return None
        if ratio == "all":
            return kl_anchor_rows(tree, None)
        target = int(n_total * float(ratio))
        if float(ratio) > 0 and target < 1:
            target = 1
        return kl_anchor_rows(tree, target, seed=seed) if target > 0 else None

    def anchor_coef(self, ctx, batch) -> float:
        """β_a (diffusion, ``ode_kl_anchor_beta``) or β·k_avg (flow, ``anchor_beta`` None → β)."""
        if ctx.process.kind == "diffusion":
            return float(self._hp(ctx, "anchor_beta"))
        b = self._hp(ctx, "anchor_beta")
        return float(self._hp(ctx, "beta") if b is None else b) * batch.extras["k_avg"]

    @staticmethod
    def diffusion_kappa(ctx, rows) -> torch.Tensor:
        """κ = c/s per row: c = const_weight (4.5), or the DDPM w_t when it is None (``weight_t``,
        train_grpo_pr.py:1934-1948), s = weight_scale_factor."""
        cw = ctx.hp["const_weight"]
        w = ctx.process.weight(rows.step).to(rows.x.dtype) if cw is None else torch.full(
            (len(rows),), float(cw), dtype=rows.x.dtype)
        return w / ctx.hp["weight_scale"]

    # ---- original ------------------------------------------------------------------------------------
    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        is_a, wgt = batch.row_data["kl_anchor"], batch.row_data["row_weight"]
        br, an = rows.select(~is_a), rows.select(is_a)
        parts, eps, stats = [], hp["clip_range"], {"anchor_rows": len(an)}
        if len(br):
            A = batch.extras["advantages"][br.sample]
            out = ctx.policy(br.x, br.step, br.cond)
            dout = out - br.out_behaviour
            d = lambda v: v.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))  # noqa: E731
            if p.kind == "diffusion":  # PCPO matching term with the constant weight κ = w/s
                kappa = d(self.diffusion_kappa(ctx, br))
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
            parts.append(wgt[~is_a] * loss)
            stats.update(clipfrac=trust.matching_clipfrac(term, A, eps, step_var),
                         approx_kl=0.5 * (term.detach() ** 2).mean().item())
        if len(an):
            parts.append(wgt[is_a] * self.anchor_coef(ctx, batch) * self._anchor_kl(ctx, an))
        batch.extras["stats"] = stats
        return torch.cat(parts).mean()

    def _kl(self, ctx, rows, out):
        """Per-row KL_t(θ‖ref) of the SDE step from the row's state, ⟨Δμ²⟩/(2σ̃²Δt) (σ of step t), or
        ⟨Δμ²⟩/(2σ̃²) with ``heuristic_kldenom`` (train_sd3_pr.py:1772-1778)."""
        p = ctx.process
        with torch.no_grad():
            mu_ref = p.mean(rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.step, stochastic=True)
        kl = p.kl(p.mean(rows.x, out, rows.step, stochastic=True), mu_ref, rows.step)
        return kl * p.dt[rows.step].to(kl.dtype) if ctx.hp["heuristic_kldenom"] else kl

    def _anchor_kl(self, ctx, rows):
        """Per anchor row: ½·c²·⟨(ε_θ − ε_ref)²⟩ (diffusion, c = const_weight, train_grpo_pr.py:2094-2114;
        the DDPM w_t when const_weight is None) or the flow SDE-step KL (train_sd3_pr.py:1851-1865)."""
        out = ctx.policy(rows.x, rows.step, rows.cond)
        cw = ctx.hp["const_weight"]
        if ctx.process.kind == "diffusion" and cw is not None:
            with torch.no_grad():
                out_ref = ctx.ref(rows.x, rows.step, rows.cond)
            return 0.5 * cw**2 * elementwise_mean((out - out_ref) ** 2)
        return self._kl(ctx, rows, out)

    # ---- RSM instance ----------------------------------------------------------------------------------
    def rsm_spec(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        is_a, wgt = batch.row_data["kl_anchor"], batch.row_data["row_weight"]
        beta = self._hp(ctx, "beta")
        b = beta if beta > 0 else 1.0
        if beta > 0 and hp["heuristic_kldenom"]:  # KL/σ̃² = Δt·(w²/2)⟨Δv²⟩: a per-row β·Δt
            b = beta * p.dt[rows.step].to(rows.x.dtype)
        A = torch.where(is_a, 0.0, batch.extras["advantages"][rows.sample])
        if p.kind == "diffusion":
            kappa = self.diffusion_kappa(ctx, rows)
        else:
            kappa = weights.kappa_guard(p, rows)
        gamma = torch.where(is_a, 1.0, weights.relative_gamma(p, rows, kappa))
        cw = hp["const_weight"]
        if p.kind == "diffusion" and cw is not None:  # ½·c²·⟨Δε²⟩ in native units
            c_anchor = torch.full((len(rows),), cw**2 / 2, dtype=rows.x.dtype)
        else:
            c_anchor = weights.kl_natural(p, rows, 1.0)
            if hp["heuristic_kldenom"]:
                c_anchor = c_anchor * p.dt[rows.step].to(rows.x.dtype)
        c1 = torch.where(is_a, wgt * self.anchor_coef(ctx, batch) * c_anchor, wgt * weights.kl_natural(p, rows, b))
        anchor = is_a | (beta > 0)
        anchor = "ref" if anchor.all() else ("behaviour" if not anchor.any() else anchor)
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(p, rows, A, b), gamma=gamma, c1=c1,
                       c2=torch.zeros(len(rows)), anchor=anchor)
