"""RSM first-order redesigns ("Ours"): terminal-sample reward gradient, no network Jacobian.

Paper: RSM, arXiv 2604.17415, Figure 5; derivations §4.1 ("full-trajectory terminal gradient, no
Jacobian"), §5.3 (κ tables), §9.1 (diffusion) and §9.2 (flow). The "original" of this method is the
paper's own redesign loss as its code writes it:

Diffusion (§9.1, ``config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml``: the pruned residual ∇-DB
trainer with ``use_z0: true``, ``reward_adaptive_mode: sigma``, ``pretrained_strength: sigma``):
    G = ∇_{z_0} r(z_0), z_0 = the trajectory's own final sample, computed once at sampling time;
    s̃_θ = ∇_{x'} log p_θ(x'|x) = −(x' − μ_θ(x))/σ_t²   (transition score at the sampled x')
    L = fls·⟨(k·s̃_θ − k·s̃_ref − λ·κ_t·G)²⟩ + unet_reg·⟨(ε_θ − ε_θ†)²⟩,   k = κ_t = σ_t.
  RSM (derivations §8.3 "Ours"; x' cancels in s̃_θ − s̃_ref = B(ε_θ − ε_ref)/σ²):
    Ψ̂/a = λ·σ_t²·G/B_t (Stein form, ``estimators.stein_shift``; score units Ψ̂ = (σ²/Ω)·λ·G),
    γ = κ_t/k = 1,  C1·a² = fls·w_t² (score units C1 = fls·Ω_t²/σ_t²: the KL-natural weighting),
    C2·a² = unet_reg,  anchor s_ref.
Flow (§9.2, ``config/hpsv2_geneval_ours.py``: pruned VGG-Flow with ``use_saved_rgrad_x1=True``,
``eta_mode='linear'``, ``reward_scale`` 1.5e7; 20-step Euler ODE):
    g = clip_τ(∇_{x_0} r(x_0)) (saved unclipped at sampling, clipped in the loss; VGG-Flow's clip,
    ``rsmbench.core.gradclip``),  v_tgt = v_ref − λ·η(σ)·g,  η = 1 − σ,
    L = ⟨(v_θ − sg(v_tgt))²⟩ + unet_reg·⟨(v_θ − v_θ†)²⟩.
  RSM (derivations §8.1 with the terminal estimator): Ψ̂/a = −λ·g (score units ((1−σ)/σ)·λ·g),
    γ = η(σ) = 1 − σ,  C1·a² = 1,  C2·a² = unet_reg,  anchor s_ref.
Trained steps: diffusion ``sd15_ours`` trains the config's ``timestep_fraction: 0.2`` with
``low_var_subsampling: true`` (11 of 50 steps per sample: the last always, one uniform step per block
of 5, so the last step weighs 6×; RSM ``sd15_first_order/trainer/ddptrainer.py:140-145,933-967``,
``rsmbench.core.weights.train_steps``); flow trains every step (``default_config.py``
``model.timestep_fraction = 1.0``). The class default trains every step. ``unet_reg_scale`` defaults
to None: the value of the process's "Ours" config, 1e2 for diffusion (the usez0 yaml
``unet_reg_scale: 1e2``) and 0 for flow (sd35 ``default_config.py`` ``model.unet_reg_scale = 0.0``).
Deliberate deviation, stated: the flow code evaluates v_θ with the unconditional CFG branch detached
(RSM ``sd35_first_order/lib/vggflow/algorithm.py:85-91`` ``_compute_velocity(..., detach_uncond=True)``,
``lib/models/cfg_wrapper.py`` ``apply``), so its θ-gradient is w·∂v_cond only; here CFG is applied by
``rsmbench.core.models.Policy`` with the gradient through both branches, in both formulations (the
authors' convention would need a detach option on ``Policy``; it is moot when the task trains without
CFG, ``cfg_scale`` 1).
Table 1 row: not a Table 1 row (the redesigns of §9.1/§9.2, built from the ∇-DB‡ and VGG-Flow‡ rows
with the current-state estimator replaced by the terminal one).
Equivalence kind: ``loss`` in both settings: the losses are identical for every θ (G is data of
the batch; no reward gradient is re-evaluated at θ).
"""
from __future__ import annotations

import torch

from rsmbench.core import weights
from rsmbench.core.diffrollout import reward_and_grad
from rsmbench.core.estimators.first import stein_shift, terminal_velocity_shift
from rsmbench.core.gradclip import ClippedRewardGradient
from rsmbench.core.method import Batch, Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rollout import generators, sample
from rsmbench.core.rsm import RSMSpec, elementwise_mean


def _el(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@register
class RSMFirstOrder(ClippedRewardGradient, Method):
    id = "rsm_fo"
    processes = ("diffusion", "flow")
    # the paper's first-order experiments are on both: SD1.5 (derivations §9.1, jaylee2000/rsm@e8be3df
    # sd15_first_order) and SD3.5-M (§9.2, sd35_first_order)
    published_processes = ("diffusion", "flow")
    order = "first"
    kind = "loss"
    table_row = {"psi": 'λ·∇_{x_0} r(x_0) of the same rollout (no network Jacobian)',
                 "gamma": 'σ_t (diffusion) / 1−σ (flow)', "c1": 'Ω²/σ² (diffusion) / (σ/(1−σ))² (flow)',
                 "c2": 'unet_reg', "branching": False, "current_state": False}
    paper = "RSM, arXiv 2604.17415, Fig. 5; derivations §9.1 (use_z0) and §9.2 (use_saved_rgrad_x1)"
    table1 = "not a Table 1 row (derivations §9.1, §9.2: redesigns of Residual ∇-DB‡ and VGG-Flow‡)"
    kind_reason = "loss identity for all θ: the terminal gradient is cached at sampling time"
    defaults = {"reward_scale": hp(1.0, gt=0), "forward_loss_scale": hp(1.0, gt=0),
                "unet_reg_scale": hp(None, type=float, ge=0),  # None: the process's "Ours" value
                "eta_mode": hp("linear", choices=("linear", "quad")),
                "clip": hp("quantile", choices=("quantile", "fixed", "none"), null=True),
                "clip_quantile": hp(0.8, ge=0, le=1), "clip_threshold": hp(None, type=float, gt=0),
                "timestep_fraction": hp(1.0, gt=0, le=1), "low_var_subsampling": True, "subsample_seed": hp(0, ge=0)}
    strength = "reward_scale"  # λ
    influence_preset = {"diffusion": "sd15_ours", "flow": "sd35_ours"}
    UNET_REG_OURS = {"diffusion": 100.0, "flow": 0.0}  # the "Ours" configs' unet_reg_scale per process
    presets = {
        "sd15_ours": {"reward_scale": 5e5, "forward_loss_scale": 1.0, "unet_reg_scale": 100.0,
                      "timestep_fraction": 0.2, "low_var_subsampling": True,
                      "source": "jaylee2000/rsm@e8be3df sd15_first_order/config/"
                                "simple_res-nabladb_sd_hps_usez0_basesnr.yaml (derivations §9.1): reward_scale 5e5, "
                                "unet_reg_scale 1e2, forward_loss_scale 1, timestep_fraction 0.2, "
                                "low_var_subsampling true"},
        "sd35_ours": {"reward_scale": 1.5e7, "unet_reg_scale": 0.0, "eta_mode": "linear", "clip": "quantile",
                      "timestep_fraction": 1.0,
                      "source": "jaylee2000/rsm@e8be3df sd35_first_order/config/hpsv2_geneval_ours.py over "
                                "config/default_config.py (derivations §9.2): reward_scale 1.5e7, eta_mode linear, "
                                "use_saved_rgrad_x1, unet_reg_scale 0, timestep_fraction 1"},
    }

    def collect(self, ctx, cond, seeds) -> Batch:
        """Diffusion: DDPM (SDE) rollout; flow: Euler ODE rollout. ∇_{x_0} r cached once per trajectory."""
        N = ctx.process.num_steps
        sto = torch.full((N,), ctx.process.kind == "diffusion")
        ro = sample(ctx.behaviour, ctx.shape, generators(seeds), cond=cond, stochastic=sto, dtype=_dtype(ctx))
        r, g = reward_and_grad(ctx.reward, ro.final, cond)
        if ctx.process.kind == "flow":
            self.reset_clipper(ctx.hp)  # τ reset at each sampling phase (VGG-Flow code)
        rows = weights.subsampled_rows(ro.transitions(only_stochastic=False), ctx.process, ctx.hp, seeds[0])
        return Batch(rollout=ro, rows=rows, rewards=r, cond=cond, extras={"terminal_grad": g})

    def unet_reg(self, ctx) -> float:
        """``unet_reg_scale``, or the process's "Ours" value when it is None (see the module docstring)."""
        v = ctx.hp.get("unet_reg_scale")
        return self.UNET_REG_OURS[ctx.process.kind] if v is None else float(v)

    def _G(self, batch, ctx, rows=None):
        """The terminal ∇_{x_0} r of each row's trajectory (clipped in the flow setting)."""
        g = batch.extras["terminal_grad"]
        if ctx.process.kind == "flow":
            g = self.clipper(ctx.hp)(g)
        return g[(batch.rows if rows is None else rows).sample]

    def influence_signal(self, batch, ctx, rows):
        return self._G(batch, ctx, rows)  # the (clipped, flow) terminal gradient, derivations §9.1–9.2

    # -- original -----------------------------------------------------------------------------------
    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        lam, G = hp["reward_scale"], self._G(batch, ctx)
        out = ctx.policy(rows.x, rows.step, rows.cond)
        with torch.no_grad():
            out_ref = ctx.ref(rows.x, rows.step, rows.cond)
        if p.kind == "diffusion":
            std = p.std(rows.step, like=rows.x)
            tscore = lambda o: -(rows.x_next - p.mean(rows.x, o, rows.step)) / std**2  # noqa: E731
            k = kappa = std
            match = hp["forward_loss_scale"] * elementwise_mean((k * tscore(out) - k * tscore(out_ref)
                                                                 - lam * kappa * G) ** 2)
        else:
            sigma = p.t[rows.step].to(rows.x.dtype)
            eta = (1 - sigma) ** 2 if hp["eta_mode"] == "quad" else (1 - sigma)
            v_tgt = out_ref - _el(lam * eta, G) * G
            match = elementwise_mean((out - v_tgt.detach()) ** 2)
        reg = self.unet_reg(ctx) * elementwise_mean((out - rows.out_behaviour) ** 2)
        return (match + reg).mean()

    # -- RSM instance -----------------------------------------------------------------------------------
    def rsm_spec(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        R, dt = len(rows), rows.x.dtype
        G = self._G(batch, ctx)
        c2 = torch.full((R,), self.unet_reg(ctx), dtype=dt)
        if p.kind == "diffusion":
            return RSMSpec(rows=rows, psi=stein_shift(p, rows, G, hp["reward_scale"]), gamma=torch.ones(R, dtype=dt),
                           c1=hp["forward_loss_scale"] * weights.kl_natural(p, rows, 2.0), c2=c2, anchor="ref")
        return RSMSpec(rows=rows, psi=terminal_velocity_shift(G, hp["reward_scale"]),
                       gamma=weights.vgg_eta(p, rows, hp["eta_mode"]), c1=torch.ones(R, dtype=dt), c2=c2,
                       anchor="ref")
