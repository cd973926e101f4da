"""Residual ∇-DB: gradient-informed detailed balance (∇-GFlowNet) for diffusion fine-tuning.

Paper: Liu, Xiao, W. Liu, Bengio, Zhang, "Efficient Diversity-Preserving Diffusion Alignment via
Gradient-Informed GFlowNets" (ICLR 2025, arXiv 2412.07775), residual ∇-DB (their Eq. for the
forward ∇-DB residual with the pretrained prior and the learned residual log-flow score).
Code: lzzcd001/nabla-gfn ``train_nablagfn.py`` (unpruned) and the RSM repo's pruned port
``sd15_first_order/trainer/simple_resnabladbtrainer.py`` (derivations §8.3).
Table 1 row: "Residual ∇-DB‡" († after pruning g_φ and the auxiliary losses).

Original (per row = sample × DDPM step t → t'; mean over rows, the code's per-step batch mean
averaged over steps and grad-accumulation). Trained steps (``timestep_fraction`` f,
``low_var_subsampling``, ``rsmbench.core.weights.train_steps``): f = 1 trains every step once (the
default); the official configs train ⌊50·f⌋ + 1 steps per sample, the last step always plus one
uniform step per block of 5 (f = 0.2, RSM ``sd15_first_order/trainer/ddptrainer.py:140-145,933-967``)
or of 10 (f = 0.1, nabla-gfn ``train_nablagfn.py:324,503-534``), so the last step weighs 6× (11×)
any other; the presets use that draw, seeded by ``subsample_seed`` + the batch's first seed (both
formulations train the same rows, so the draw does not touch the equivalence). With the transition
score s̃ = ∇_{x'} log p(x'|x) = −(x' − μ)/σ² at the sampled x', k = ``pretrained_strength``,
λ = ``reward_scale``:
    G      = ∇_{x'} r(x̂_0(x'; ε_θ(x', t')))   (exact Jacobian through ε_θ; x̂_0 = x' after the last step)
    target = k·s̃_ref + λ·κ(t')·G  [+ ∇g_φ(x', t')  if use_flow_net, not on the last step]
    L      = fls·⟨(k·s̃_θ − sg(target))²⟩ + unet_reg·⟨(ε_θ − ε_θ†)²⟩
             [+ rls·⟨(∇_x log p_θ(x'|x)·k − [∇_x log p_ref·k − ∇g_φ(x, t) − λκ(t)·∇_x r(x̂_0(x))])²⟩
              + ⟨∇g_φ(x', 0)²⟩ on last-step rows   if use_flow_net]
κ(t') = ᾱ_{t'} ('squared'). The reverse term's ∇_x log p_θ is graph-free in the code
(``allow_2nd=False``), so the reverse and terminal losses train only g_φ.

RSM instance (derivations §8.3): x' cancels in s̃_θ − s̃_ref = (B/σ²)·(ε_θ − ε_ref), so
    Ψ̂ = (σ²/Ω)·λ·G (native Ψ̂/a = λσ²G/B, ``stein_shift``),  γ = κ(t')/k,
    C1 = fls·(k·Ω/σ²)² (native fls·(kB/σ²)²),  C2 = unet_reg·(1−ᾱ_t) (native unet_reg),  anchor s_ref.

Equivalence kind: ``loss`` for the pruned default (``use_flow_net=False``): identical losses for
every θ (G re-evaluated with the current θ in both). ``use_flow_net=True`` (preset
``nabla_gfn_hps``) is ``approximate``: the θ-gradient gap is the ∇g_φ shift of the target and
vanishes as ``flow_scale`` → 0. The flow network is a tiny random-init copy of the policy
architecture (not the SD1.5-size UNet); k multiplies both transition scores, as the pruned port
does (nabla-gfn applies ``pretrained_strength`` to the reference only; the default k = 1 agrees).
Deliberate deviation, stated: on the last step (t' = 0) the code still applies Tweedie with ε_θ at
model time clamp(t − 20, 0) = 0 (RSM ``simple_resnabladbtrainer.py:379-397``, ``:566-569``); here
x̂_0 = x' there (the sample is final), which differs by the √(1−ᾱ_0) ≈ 0.03 ε-term of that call.
"""
from __future__ import annotations

import torch

from methods.vgg_flow import auxiliary_net
from rsmbench.core import weights
from rsmbench.core.estimators import first as fo
from rsmbench.core.method import Batch, Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec, elementwise_mean


def _el(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))



@register
class ResidualNablaDB(Method):
    id = "nabla_db"
    processes = ("diffusion",)
    published_processes = ("diffusion",)  # SD1.5 (lzzcd001/nabla-gfn@6b74d4c config/default_config.py)
    order = "first"
    kind = "loss"
    table_row = {"psi": '(σ²/Ω)·λ·∇_{x_{t−1}} r(x̂₀(x_{t−1}))', "gamma": "ᾱ_{t−1} ('squared')",
                 "c1": '(Ω/σ²)²', "c2": 'unet_reg·(1−ᾱ_t)', "branching": False, "current_state": True}
    paper = "Residual ∇-DB (∇-GFlowNet): Liu et al. 2025, arXiv 2412.07775; derivations §8.3"
    table1 = "Residual ∇-DB‡ (pruned †)"
    kind_reason = ("pruned (use_flow_net=False): forward loss + unet_reg ≡ RSM loss for every θ; "
                   "x' cancels in s̃_θ − s̃_ref; G re-evaluated at the current θ in both")
    approx_reason = ("use_flow_net=True: learned ∇g_φ(x') shifts the forward target (gap ∝ ∇g_φ, "
                     "vanishes as flow_scale → 0); reverse/terminal losses do not reach θ")
    defaults = {"reward_scale": hp(1.0, gt=0),
                "reward_adaptive_mode": hp("squared", choices=("squared", "sqrt", "sigma", "constant")),
                "reward_adaptive_sigma_scale": hp(1.0, gt=0), "pretrained_strength": hp(1.0, gt=0),
                "forward_loss_scale": hp(1.0, gt=0), "unet_reg_scale": hp(1.0, ge=0), "use_flow_net": False,
                "reverse_loss_scale": hp(1.0, ge=0), "flow_scale": hp(1.0, ge=0), "flow_seed": hp(3000, ge=0),
                "timestep_fraction": hp(1.0, gt=0, le=1), "low_var_subsampling": True, "subsample_seed": hp(0, ge=0)}
    strength = "reward_scale"  # λ
    influence_preset = {"diffusion": "sd15_pruned_baseline"}
    presets = {
        "sd15_pruned_baseline": {
            "reward_scale": 5e5, "reward_adaptive_mode": "squared", "pretrained_strength": 1.0,
            "forward_loss_scale": 1.0, "unet_reg_scale": 100.0, "use_flow_net": False,
            "timestep_fraction": 0.2, "low_var_subsampling": True,
            "source": "jaylee2000/rsm@e8be3df sd15_first_order/config/simple_res-nabladb_sd_hps.yaml "
                      "(reward_scale 5e5, unet_reg_scale 1e2, pretrained_strength 1, reward_adaptive_mode "
                      "squared, timestep_fraction 0.2, low_var_subsampling true; derivations §9.1)"},
        "nabla_gfn_hps": {
            "reward_scale": 1e4, "reward_adaptive_mode": "squared", "pretrained_strength": 1.0,
            "forward_loss_scale": 1.0, "unet_reg_scale": 1e2, "use_flow_net": True, "reverse_loss_scale": 1.0,
            "timestep_fraction": 0.1, "low_var_subsampling": True,
            "source": "lzzcd001/nabla-gfn@6b74d4c config/hpsv2.py (reward_scale 1e4, unet_reg_scale 1e2) over "
                      "config/default_config.py (no_flow False, reverse_loss_scale 1, pretrained_strength 1, "
                      "reward_adaptive_mode squared, timestep_fraction 0.1, sampling.low_var_subsampling True)"},
        "toy_flow_net": {"use_flow_net": True,
                         "source": "this repo: the unpruned original at toy reward scale, for gap checks"},
    }

    def equivalence_kind(self, hp):
        return ("approximate", self.approx_reason) if hp["use_flow_net"] else (self.kind, self.kind_reason)

    def collect(self, ctx, cond, seeds) -> Batch:
        """DDPM rollout from θ†; the trained steps per sample as the official trainers draw them."""
        batch = super().collect(ctx, cond, seeds)
        batch.rows = weights.subsampled_rows(batch.rows, ctx.process, ctx.hp, seeds[0])
        return batch

    def flow_net(self, ctx):
        """∇g_φ: the residual log-flow *score* network (same shape as x, as the code's UNet)."""
        if getattr(self, "_flow", None) is None:
            self._flow = auxiliary_net(ctx.policy.net, ctx.hp["flow_seed"], _dtype(ctx), ctx.hp["flow_scale"])
        self._flow.scale = ctx.hp["flow_scale"]
        return self._flow

    # -- the original -----------------------------------------------------------------------------
    def _kappa(self, ctx, ab, std):
        """``reward_adaptive_mode`` as the code: ᾱ ('squared'), √ᾱ ('sqrt', nabla-gfn's else
        branch), s·σ_t ('sigma', RSM port), 1 ('constant')."""
        mode = ctx.hp["reward_adaptive_mode"]
        table = {"squared": lambda: ab, "sqrt": lambda: ab.sqrt(),
                 "sigma": lambda: ctx.hp.get("reward_adaptive_sigma_scale", 1.0) * std,
                 "constant": lambda: torch.ones_like(ab)}
        if mode not in table:
            raise ValueError(f"unknown reward_adaptive_mode {mode!r}; choose {', '.join(table)}")
        return table[mode]()

    def _score_r(self, ctx, x, step, cond, ab, std):
        """λ·κ·∇_x r(x̂_0(x; ε_θ(x, t))) at model step `step` (x̂_0 = x past the last step)."""
        p = ctx.process
        N = p.num_steps
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            idx = step.clamp(max=N - 1)
            eps = ctx.policy(xg, idx, cond)
            abt = _el(p.alphas_cumprod_t[idx].to(x.dtype), xg)
            x0 = (xg - (1 - abt).sqrt() * eps) / abt.sqrt()
            x0 = torch.where(_el(step >= N, xg), xg, x0)
            (G,) = torch.autograd.grad(ctx.reward(x0, cond).sum(), xg)
        kappa = self._kappa(ctx, ab.to(x.dtype), std.to(x.dtype))
        return ctx.hp["reward_scale"] * _el(kappa, x) * G.detach()

    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        k = hp["pretrained_strength"]
        x, xn, i, cond = rows.x, rows.x_next, rows.step, rows.cond
        std2 = _el(p.sde.std[i].to(x.dtype) ** 2, x)
        eps = ctx.policy(x, i, cond)
        with torch.no_grad():
            eps_ref = ctx.ref(x, i, cond)
        score_pf = -(xn - p.mean(x, eps, i)) / std2 * k  # k·s̃_θ
        score_pf_ref = -(xn - p.mean(x, eps_ref, i)) / std2 * k
        score_r_next = self._score_r(ctx, xn, i + 1, cond, p.alphas_cumprod_prev[i], p.sde.std[i])
        target = score_pf_ref + score_r_next
        end = i == p.num_steps - 1
        loss = 0.0
        if hp["use_flow_net"]:
            flow = self.flow_net(ctx)
            t_next = p.prev_timesteps[i].to(x.dtype)
            res_next = flow(xn, t_next, cond)
            target = target + torch.where(_el(end, x), torch.zeros_like(res_next), res_next)
            loss = hp["reverse_loss_scale"] * self._reverse(ctx, rows, eps, eps_ref, flow, end).mean() \
                + (elementwise_mean(res_next**2) * end).sum() / (end.sum() + 1e-6)
        loss = loss + hp["forward_loss_scale"] * elementwise_mean((score_pf - target.detach()) ** 2).mean()
        if hp["unet_reg_scale"] > 0:
            loss = loss + hp["unet_reg_scale"] * elementwise_mean((eps - rows.out_behaviour) ** 2).mean()
        return loss

    def _reverse(self, ctx, rows, eps, eps_ref, flow, end):
        """Reverse ∇-DB at x_t (nabla-gfn): ∇_x log p(x'|x) is graph-free, so only g_φ learns."""
        p, k, x, xn, i, cond = ctx.process, ctx.hp["pretrained_strength"], rows.x, rows.x_next, rows.step, rows.cond
        std2 = _el(p.sde.std[i].to(x.dtype) ** 2, x)

        def rev(pol):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                (gx,) = torch.autograd.grad(((xn - p.mean(xg, pol(xg, i, cond), i)) ** 2).sum(), xg)
            return -gx.detach() / (2 * std2) * k

        score_r = self._score_r(ctx, x, i, cond, p.alphas_cumprod_t[i], p.sde.std[i])
        tgt = rev(ctx.ref) - flow(x, p.timesteps[i].to(x.dtype), cond) - score_r
        tgt = torch.where(_el(end, x), torch.zeros_like(tgt), tgt)
        return elementwise_mean((rev(ctx.policy) - tgt) ** 2)

    # -- the RSM instance -------------------------------------------------------------------------
    def rsm_spec(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        k = hp["pretrained_strength"]
        G = fo.next_state(ctx.policy, ctx.reward, rows, jacobian=True)
        R = len(rows)
        return RSMSpec(rows=rows, psi=fo.stein_shift(p, rows, G, hp["reward_scale"]),
                       gamma=weights.nabla_db_kappa(p, rows, hp["reward_adaptive_mode"],
                                                    hp.get("reward_adaptive_sigma_scale", 1.0)) / k,
                       c1=hp["forward_loss_scale"] * weights.transition_matching(p, rows, k),
                       c2=torch.full((R,), float(hp["unet_reg_scale"]), dtype=rows.x.dtype), anchor="ref")

    def influence_signal(self, batch, ctx, rows):
        """∇_{x'} r(x̂₀(x')) at the sampled next state (derivations §8.3), as rsm_spec builds it."""
        return fo.next_state(ctx.policy, ctx.reward, rows, jacobian=True)
