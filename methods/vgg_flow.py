"""VGG-Flow: value-gradient guided velocity matching for flow models.

Paper: Liu, Xiao, Domingo-Enrich, W. Liu, Zhang, "Value Gradient Guidance for Flow Matching
Alignment" (NeurIPS 2025, arXiv 2512.05116): optimal-control objective
min E[(λ/2)∫‖ṽ_θ‖²dt − r(x_1)], HJB ⇒ ṽ* = −∇V/λ with the value gradient parameterised as
g_φ = −η_τ·sg(∇r(x̂_1(x_τ))) + ν_φ(x_τ, τ) (their §4). Code: lzzcd001/vggflow as ported in the RSM
repo, ``sd35_first_order/lib/vggflow/{algorithm,trainer,reward_gradient}.py`` (derivations §8.1).
Table 1 row: "VGG-Flow‡" (current-state estimator; † after pruning ν_φ and the auxiliary losses).

Original (per row = sample × trained step of a 20-step Euler ODE rollout; mean over rows, which is
the code's per-timestep batch mean summed over timesteps / (grad_accum · n_train_timesteps)). The RSM
port trains every step (``model.timestep_fraction = 1.0``); the original VGG-Flow trains
``timestep_fraction 0.25`` with low-variance subsampling (the last step plus one uniform step per
block of 4, ``rsmbench.core.weights.train_steps``) and clamps every trained index to ≥ 1, so the first
step (σ = 1) is never trained (lzzcd001/vggflow@978f1fb ``train_vggflow.py:378-380, 535-575``;
``min_train_step`` 1 in its presets):
    g      = clip_τ(∇_{x̂_0} r(x̂_0)),  x̂_0 = x_t + (σ_last − σ)·sg(v_θ(x_t))   (identity Jacobian)
    v_tgt  = v_ref(x_t) − λ·η(σ)·g  [+ ν_φ(x_t, t)  if use_value_net]
    L      = ⟨(v_θ − sg(v_tgt))²⟩ + unet_reg·⟨(v_θ − v_θ†)²⟩
             [+ L_consistency + 1000·L_terminal  if use_value_net]
with η(σ) = (1−σ)² ('quad') and clip_τ VGG-Flow's per-sample quantile clip (``rsmbench.core.gradclip``).
L_consistency is the code's finite-difference HJB residual on ∇V = ν_φ/λ − η·g (time step 1e-4
in model-time units, space step 1e-4 along sg(v_ref/λ + ∇V)); L_terminal = ⟨ν_φ²⟩ on last-step rows.

RSM instance (derivations §8.1): in score units ⟨(v_θ − v_ref + λη·g)²⟩ =
(σ/(1−σ))²·⟨(s_θ − s_ref − ((1−σ)/σ)·λη·g)²⟩, i.e.
    Ψ̂ = ((1−σ)/σ)·λ·g (native Ψ̂/a = −λ·g),  γ = η(σ),  C1 = (σ/(1−σ))² (native 1),
    C2 = unet_reg·(σ/(1−σ))² (native unet_reg),  anchor s_ref,  current-state ‡.
(The split γ vs Ψ̂ keeps both finite at σ = 1, where a = 0; only C1·γ·Ψ̂ is identifiable.)

Equivalence kind: ``loss`` (pruned, the default ``use_value_net=False``): identical loss values
for every θ, since g is re-evaluated with the current θ in both formulations. With
``use_value_net=True`` (preset ``sd35_value_net``) the target carries the learned ν_φ and the
kind is ``approximate``: the θ-gradient gap is exactly the ν_φ shift of the target (the
auxiliary losses do not reach θ: their reward gradients are graph-free) and vanishes as ν_φ → 0
(``value_scale`` → 0). Deviations, stated: CFG is applied identically in both formulations with
the gradient through both branches (the code detaches the unconditional branch of v_θ); reward
masking (off in the code) is not implemented; the value net is a tiny random-init copy of the
policy architecture (``rsmbench.core.models.build_net``), not the SD3.5 value UNet.
"""
from __future__ import annotations

import torch
from torch import nn

from rsmbench.core import weights
from rsmbench.core.estimators import first as fo
from rsmbench.core.gradclip import ClippedRewardGradient
from rsmbench.core.method import Batch, Method, _dtype, register
from rsmbench.core.models import TextUNet, TimeMLP, TinyUNet, VHead, build_net
from rsmbench.core.params import hp
from rsmbench.core.rollout import generators, sample
from rsmbench.core.rsm import RSMSpec, elementwise_mean

EPS_STEP = EPS_TIME = 1e-4  # the code's finite-difference steps (algorithm.py)


class ScaledAux(nn.Module):
    """An auxiliary network (value ν_φ, residual log-flow score ∇g_φ) with an output scale, so a
    test can shrink it to 0 and watch the approximate gap vanish."""

    def __init__(self, net: nn.Module, scale: float = 1.0):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x, t, cond=None):
        return self.scale * self.net(x, t.to(x.dtype).reshape(-1).expand(x.shape[0]), cond)


def auxiliary_net(like: nn.Module, seed: int, dtype, scale: float = 1.0) -> ScaledAux:
    """A tiny random-init network with the policy's input/output shape and conditioning (mlp, unet or
    text_unet; a VHead's inner net)."""
    if isinstance(like, VHead):
        like = like.inner
    if isinstance(like, TextUNet):  # the policy's prompts and 2×2 folding, narrower (8, 16) levels
        net = build_net("text_unet", getattr(like, "prediction", "epsilon"), seed=seed,
                        dtype=dtype, prompts=like.prompts, sample_size=like.unet.config.sample_size * like.patch,
                        channels=like.unet.config.in_channels // like.patch ** 2, block_out_channels=(8, 16),
                        norm_num_groups=4, attention_levels=1, attention_heads=2, text_dim=32, text_layers=1,
                        text_heads=2, patch=like.patch)
    elif isinstance(like, TimeMLP):
        net = build_net("mlp", like.prediction, seed=seed, dtype=dtype, dim=like.dim, hidden=32, depth=2,
                        temb=like.temb, num_classes=like.num_classes)
    elif isinstance(like, TinyUNet):
        cfg = like.unet.config
        net = build_net("unet", like.prediction, seed=seed, dtype=dtype, sample_size=cfg.sample_size,
                        channels=cfg.in_channels, block_out_channels=(8, 16), norm_num_groups=8,
                        num_classes=like.num_classes)
    else:
        raise ValueError(f"no auxiliary-network recipe for {type(like).__name__}")
    return ScaledAux(net, scale)


def net_at_time(policy, x, t, cond=None):
    """The policy's CFG-combined output at an arbitrary model time t (R,) (the code's t − ε)."""
    net = policy.net
    if cond is None or policy.cfg_scale == 1.0:
        return net(x, t, cond)
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.full_like(cond, net.num_classes), cond]))
    uncond, c = both.chunk(2)
    return uncond + policy.cfg_scale * (c - uncond)


def _el(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@register
class VGGFlow(ClippedRewardGradient, Method):
    id = "vgg_flow"
    processes = ("flow",)
    published_processes = ("flow",)  # flow matching models only (arXiv 2512.05116: SD3, §5)
    order = "first"
    kind = "loss"
    table_row = {"psi": 'λ·∇r(x̂₀), x̂₀ = x_t − σ·sg(v_θ) (identity Jacobian)', "gamma": '((1−σ)/σ)·(1−σ)²',
                 "c1": '(σ/(1−σ))²', "c2": 'unet_reg (0)', "branching": False, "current_state": True}
    paper = "VGG-Flow: Liu et al. 2025, arXiv 2512.05116, §4 (matching + HJB consistency); derivations §8.1"
    table1 = "VGG-Flow‡ (pruned †)"
    kind_reason = ("pruned (use_value_net=False): matching loss ≡ RSM loss for every θ; "
                   "g re-evaluated at the current θ in both formulations")
    approx_reason = ("use_value_net=True: learned ν_φ shifts the target (gap ∝ ν_φ, vanishes as "
                     "value_scale → 0); consistency/terminal losses do not reach θ")
    defaults = {"reward_scale": hp(1.0, gt=0), "eta_mode": hp("quad", choices=("quad", "linear")),
                "unet_reg_scale": hp(0.0, ge=0),
                "clip": hp("quantile", choices=("quantile", "fixed", "none"), null=True),
                "clip_quantile": hp(0.8, ge=0, le=1), "clip_threshold": hp(None, type=float, gt=0),
                "use_value_net": False, "coeff_terminal": hp(1000.0, ge=0), "value_scale": hp(1.0, ge=0),
                "value_seed": hp(2000, ge=0), "timestep_fraction": hp(1.0, gt=0, le=1), "low_var_subsampling": True,
                "subsample_seed": hp(0, ge=0), "min_train_step": hp(0, ge=0)}
    strength = "reward_scale"  # λ
    influence_preset = {"flow": "sd35_baseline"}
    presets = {
        "sd35_baseline": {"reward_scale": 3e7, "eta_mode": "quad", "unet_reg_scale": 0.0, "clip": "quantile",
                          "use_value_net": False, "timestep_fraction": 1.0,
                          "source": "jaylee2000/rsm@e8be3df sd35_first_order/config/default_config.py (pruned "
                                    "baseline: reward_scale 3e7, eta_mode quad, unet_reg_scale 0, use_value_net "
                                    "False, quantile_clipping True, timestep_fraction 1.0)"},
        "sd35_value_net": {"reward_scale": 3e7, "eta_mode": "quad", "unet_reg_scale": 0.0, "clip": "quantile",
                           "use_value_net": True, "coeff_terminal": 1000.0, "timestep_fraction": 1.0,
                           "source": "not a published config: jaylee2000/rsm@e8be3df sd35_first_order/config/"
                                     "default_config.py (which has model.use_value_net = False, :36) with the value "
                                     "net switched on, as its comments ':15-16 # 1 for value_net True' anticipate; "
                                     "coeff_terminal 1000 from the same file"},
        "vggflow_original": {"reward_scale": 1e3, "eta_mode": "quad", "unet_reg_scale": 0.0, "clip": "quantile",
                             "use_value_net": True, "coeff_terminal": 1000.0, "timestep_fraction": 0.25,
                             "low_var_subsampling": True, "min_train_step": 1,
                             "source": "lzzcd001/vggflow@978f1fb config/default_config.py + config/aesthetic.py "
                                       "(reward_scale 1e3, timestep_fraction 0.25, low_var_subsampling True, "
                                       "use_value_net True, coeff_terminal 1000, eta_mode quad, unet_reg_scale 0, "
                                       "quantile_clipping True; lr 1e-4 is a task setting); train_vggflow.py:575 "
                                       "(indices clamped to ≥ 1)"},
        "vggflow_run_sh": {"reward_scale": 1e4, "eta_mode": "linear", "unet_reg_scale": 0.0, "clip": "quantile",
                           "use_value_net": True, "coeff_terminal": 1e4, "timestep_fraction": 0.25,
                           "low_var_subsampling": True, "min_train_step": 1,
                           "source": "lzzcd001/vggflow@978f1fb run.sh (config/aesthetic.py with reward_scale 1e4, "
                                     "unet_reg_scale 0, low_var_subsampling True, coeff_terminal 1e4, eta_mode "
                                     "linear; lr 1e-3 is a task setting)"},
        "toy_value_net": {"use_value_net": True,
                          "source": "this repo: the unpruned original at toy reward scale (λ = 1), for gap checks"},
    }

    # -- configuration-dependent kind -------------------------------------------------------------
    def equivalence_kind(self, hp):
        return ("approximate", self.approx_reason) if hp["use_value_net"] else (self.kind, self.kind_reason)

    # -- state: the reward-gradient clipper (ClippedRewardGradient) and the value network -----------
    def value_net(self, ctx):
        if getattr(self, "_value", None) is None:
            self._value = auxiliary_net(ctx.policy.net, ctx.hp["value_seed"], _dtype(ctx), ctx.hp["value_scale"])
        self._value.scale = ctx.hp["value_scale"]
        return self._value

    # -- rollout: deterministic Euler ODE (the code samples with the ODE), every step a row -------
    def collect(self, ctx, cond, seeds):
        N = ctx.process.num_steps
        ro = sample(ctx.behaviour, ctx.shape, generators(seeds), cond=cond,
                    stochastic=torch.zeros(N, dtype=torch.bool), dtype=_dtype(ctx))
        self.reset_clipper(ctx.hp)  # the code resets τ to 1.0 at every epoch's sampling phase
        rows = weights.subsampled_rows(ro.transitions(only_stochastic=False), ctx.process, ctx.hp, seeds[0],
                                       int(ctx.hp.get("min_train_step", 0)))
        return Batch(rollout=ro, rows=rows, rewards=ctx.reward(ro.final, cond), cond=cond)

    # -- the original -------------------------------------------------------------------------------
    def _rgrad(self, ctx, x, v, sigma, cond, clip):
        """∇_{x} r(x + (0 − σ)·v) per sample, clipped (v detached by the caller or not)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            vv = v(xg) if callable(v) else v
            r = ctx.reward(xg - _el(sigma, xg) * vv, cond)
            (g,) = torch.autograd.grad(r.sum(), xg)
        return clip(g.detach())

    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        lam, clipper = hp["reward_scale"], self.clipper(hp)
        sigma = p.t[rows.step].to(rows.x.dtype)
        eta = lambda s: (1 - s) ** 2 if hp["eta_mode"] == "quad" else (1 - s)  # noqa: E731
        v = ctx.policy(rows.x, rows.step, rows.cond)
        g = self._rgrad(ctx, rows.x, v.detach(), sigma, rows.cond, clipper)  # identity Jacobian
        with torch.no_grad():
            v_ref = ctx.ref(rows.x, rows.step, rows.cond)
        target = v_ref - _el(eta(sigma) * lam, g) * g
        loss = 0.0
        if hp["use_value_net"]:
            nu = self.value_net(ctx)(rows.x, p.model_t[rows.step].to(rows.x.dtype), rows.cond)
            target = target + nu
            loss = self._consistency(ctx, rows, sigma, nu, g, v_ref, eta) \
                + hp["coeff_terminal"] * self._terminal(ctx, rows, nu)
        loss = loss + elementwise_mean((v - target.detach()) ** 2).mean()
        if hp["unet_reg_scale"] > 0:
            loss = loss + hp["unet_reg_scale"] * elementwise_mean((v - rows.out_behaviour) ** 2).mean()
        return loss

    def _consistency(self, ctx, rows, sigma, nu, g, v_ref, eta):
        """The code's finite-difference HJB residual (algorithm.py ``compute_value_consistency_loss``)."""
        p, lam, x, cond = ctx.process, ctx.hp["reward_scale"], rows.x, rows.cond
        T = p.scheduler.config.num_train_timesteps
        clipper = self.clipper(ctx.hp)
        clip = lambda z: clipper(z, record=False)  # noqa: E731  same τ; only the main g feeds the quantile
        value = self.value_net(ctx)
        t = p.model_t[rows.step].to(x.dtype)
        nabla_v = nu / lam - _el(eta(sigma), g) * g
        # d(∇V)/dt at t − ε_t, reward gradient through v_θ (exact Jacobian)
        t_prev = t - EPS_TIME
        s_prev = t_prev / T
        g_prev = self._rgrad(ctx, x, lambda z: net_at_time(ctx.policy, z, t_prev, cond), s_prev, cond, clip)
        nabla_prev = value(x, t_prev, cond) / lam - _el(eta(s_prev), g_prev) * g_prev
        temporal = (nabla_prev - nabla_v) / EPS_TIME
        # reference drift along ∇V (gradient reaches φ through the input)
        vel = (ctx.ref(x + nabla_v * EPS_STEP, rows.step, cond) - v_ref) / EPS_STEP
        # λ∇V along sg(v_ref/λ + ∇V)
        xp = (x + (v_ref / lam + nabla_v).detach() * EPS_STEP).detach()
        g_p = self._rgrad(ctx, xp, lambda z: ctx.policy(z, rows.step, cond), sigma, cond, clip)
        spatial = (value(xp, t, cond) - _el(eta(sigma) * lam, g_p) * g_p - nabla_v * lam) / EPS_STEP
        return ((temporal - vel - spatial) / lam).pow(2).mean()

    def _terminal(self, ctx, rows, nu):
        end = (rows.step == ctx.process.num_steps - 1).to(nu.dtype)
        return (elementwise_mean(nu**2) * end).sum() / (end.sum() + 1e-6)

    # -- the RSM instance --------------------------------------------------------------------------
    def rsm_spec(self, batch, ctx):
        rows, hp = batch.rows, ctx.hp
        G = fo.current_state(ctx.policy, ctx.reward, rows.x, rows.step, rows.cond, jacobian=False)
        G = self.clipper(hp)(G)
        R = len(rows)
        # Ψ̂/a = −λ·G (Ψ̂ = ((1−σ)/σ)·λ·G in score units, a = −(1−σ)/σ); γ = η(σ)
        return RSMSpec(rows=rows, psi=-hp["reward_scale"] * G,
                       gamma=weights.vgg_eta(ctx.process, rows, hp["eta_mode"]),
                       c1=torch.ones(R, dtype=rows.x.dtype),
                       c2=torch.full((R,), float(hp["unet_reg_scale"]), dtype=rows.x.dtype), anchor="ref")

    def influence_signal(self, batch, ctx, rows):
        """The clipped current-state gradient through the detached velocity (derivations §8.1), as rsm_spec."""
        return self.clipper(ctx.hp)(fo.current_state(ctx.policy, ctx.reward, rows.x, rows.step, rows.cond,
                                                     jacobian=False))
