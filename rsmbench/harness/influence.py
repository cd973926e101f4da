"""Temporal influence κ(t) and the normalized influence h(t) of every registered method (the RSM
paper's h(t) figure; RSM arXiv 2604.17415, derivations §5.2–5.3).

At θ = θ† the value-guidance part of a row's RSM gradient is −2·C1·γ·⟨Ψ̂·∂s_θ⟩; in native units
(``rsmbench.core.rsm``: c1 = C1·a², ψ = Ψ̂/a) it is −2·c1·γ·⟨ψ·∂o_θ⟩. Writing ψ as a multiple of the raw
signal G of the method (zeroth-order: G = A·ξ; first-order: the stop-gradient reward gradient the
method uses), the per-row coefficient is (derivations §5.2)

    κ_row = 2·c1·γ·|⟨ψ·G⟩| / ⟨G·G⟩          (the 2 is d/do of the squared norm),

κ(t) = mean of κ_row over the rows at step t (0 where a method trains no row at t: the compute-level
suppression of branching schedules, §5.3), and h(t) = κ(t)/Σ_t' κ(t').

Everything is read from each method's own ``collect``/``prepare``/``rsm_spec`` on the real grids
(SD1.5 50-step DDIM η = 1, scaled-linear betas; SD3.5 10-step Flow-GRPO SDE, a = 0.7, shift 3)
with the harness's tiny 2-D networks (``rsmbench.harness.equivalence``): κ depends on the schedule
constants only, not on the networks, because every Ψ̂ in the suite is a per-row scalar times G.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rsmbench.core import method as registry
from rsmbench.core import style
from rsmbench.core.models import Policy
from rsmbench.core.process import make_process
from rsmbench.core.rsm import elementwise_mean
from rsmbench.harness import equivalence

GRIDS = {"diffusion": dict(num_steps=50, eta=1.0),  # SD1.5: scaled_linear betas (process defaults)
         "flow": dict(num_steps=10, noise_level=0.7, shift=3.0)}  # SD3.5-M zeroth-order grid

# The preset each method is read with on each real grid is its ``influence_preset[kind]`` (absent: its
# defaults), and its raw signal G is its ``influence_signal`` (rsmbench.core.method): both live in the
# method's own file.


def real_context(m, kind: str, hp: dict | None = None, seed: int = 0):
    """The harness's tiny 2-D context (float64) with the process swapped for the real grid."""
    ctx = equivalence.build_context(m, kind, torch.float64, seed, hp)
    p = make_process(kind, **GRIDS[kind])
    for name in ("policy", "ref", "behaviour"):
        pol = getattr(ctx, name)
        setattr(ctx, name, Policy(pol.net, p, pol.cfg_scale))
    ctx.process = p
    return ctx


def row_kappa(m, batch, ctx, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(κ_row, valid) for every row of the spec (invalid: G ≡ 0 or a KL-anchor row)."""
    rows = spec.rows
    G = m.influence_signal(batch, ctx, rows).detach()  # zeroth order A·ξ; first order the method's own G
    gg = elementwise_mean(G * G)
    if m.influence_rms_ratio:  # ψ ∦ G (DRaFT, AlignProp): κ_row = 2·c1·γ·rms(ψ)/rms(G)
        ratio = elementwise_mean(spec.psi**2).sqrt() / gg.sqrt()
    else:
        ratio = elementwise_mean(spec.psi * G).abs() / gg
    valid = gg > 1e-300
    anchor = batch.extras.get("kl_anchor")
    if isinstance(anchor, torch.Tensor) and anchor.shape == valid.shape:
        valid = valid & ~anchor
    kappa = 2 * spec.c1 * spec.gamma * ratio
    return torch.where(valid, kappa, torch.zeros_like(kappa)), valid


def kappa_profile(method_id: str, kind: str, preset: str | None = "auto", hp: dict | None = None,
                  seed: int = 0) -> pd.DataFrame:
    """κ(t), h(t) per step of `kind`'s real grid for one method (one row per step)."""
    m = registry.get(method_id)
    if preset == "auto":
        preset = m.influence_preset.get(kind)
    hp_all = m.hparams(preset, **(hp or {}))
    ctx = real_context(m, kind, hp_all, seed)
    ctx.hp = hp_all
    batch = equivalence.collect(m, ctx, seed)
    spec = m.rsm_spec(batch, ctx)
    k_row, valid = row_kappa(m, batch, ctx, spec)
    p, N = ctx.process, ctx.process.num_steps
    step = spec.rows.step
    kappa = np.zeros(N)
    n_rows = np.zeros(N, dtype=int)
    for i in range(N):
        sel = (step == i) & valid
        n_rows[i] = int(sel.sum())
        if n_rows[i]:
            kappa[i] = k_row[sel].mean().item()
    total = kappa.sum()
    h = kappa / total if total > 0 else np.full(N, math.nan)
    return pd.DataFrame({"method": method_id, "process": kind, "preset": preset or "defaults",
                         "order": m.order, "step": np.arange(N), "t": _time(p), "log_snr": log_snr(p),
                         "kappa": kappa, "h": h, "rows": n_rows})


def _time(p) -> np.ndarray:
    return (p.timesteps if p.kind == "diffusion" else p.t).double().numpy()


def log_snr(p) -> np.ndarray:
    """log-SNR at each step's input: log(ᾱ/(1−ᾱ)) (diffusion), log(((1−t)/t)²) (flow; −∞ at t = 1)."""
    if p.kind == "diffusion":
        ab = p.alphas_cumprod_t
        return torch.log(ab / (1 - ab)).numpy()
    t = p.t
    with np.errstate(divide="ignore"):
        return np.log((((1 - t) / t) ** 2).numpy())


def profiles(methods=None, kinds=("diffusion", "flow")) -> pd.DataFrame:
    reg = registry.load_all()
    ids = sorted(reg) if methods is None else list(methods)
    frames = [kappa_profile(mid, kind) for kind in kinds for mid in ids if kind in reg[mid].processes]
    return pd.concat(frames, ignore_index=True)


CAPTION = (
    "Temporal influence of every registered method. Top row: κ(t), the coefficient of the raw signal G "
    "(zeroth-order: A·ξ; first-order: the method's stop-gradient reward gradient) in the value-guidance part "
    "of the RSM gradient at θ = θ†, κ = 2·C1·γ·|⟨ψ·G⟩|/⟨G·G⟩ in native units (ε or v), read from each "
    "method's own rsm_spec with its published preset on the real grids (diffusion: SD1.5 50-step DDPM, "
    "scaled-linear betas; flow: SD3.5 10-step Flow-GRPO SDE, a = 0.7, shift 3), averaged over rows per step; "
    "log scale, unitless (native-output units per unit of G). Bottom row: h(t) = κ(t)/Σκ; steps a branching "
    "schedule does not train have κ = h = 0 (not drawn on the log axis). DRaFT/AlignProp Ψ̂ carries the "
    "exact chain Jacobian, so their κ is the RMS ratio 2·C1·γ·rms(ψ)/rms(∇_{x_N} r). Flow t = 1 (log-SNR = −∞) "
    "is drawn at the left edge. κ includes each preset's reward scale λ, so only h compares across methods. "
    "Methods that train a random step per batch (ReFL's window, AlignProp's random truncation) show the steps "
    "drawn in the one batch collected here (seed 0); DRaFT-1 trains only the last step. Each method keeps its "
    "colour and marker of every report figure; zeroth-order methods are solid with filled markers, first-order dashed "
    "with open markers (on the 50-step grid a marker every 5th step)."
)


def plot(df: pd.DataFrame, out_dir, name: str = "influence") -> list[Path]:
    """κ(t) (top, log scale) and h(t) (bottom) per real grid; every method in its fixed style
    (``rsmbench.core.style``: colour and marker of its own, zeroth-order solid/filled, first-order
    dashed/open), one legend under the panels."""
    style.use()
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in ("diffusion", "flow") if k in set(df.process)]
    fig, axes = plt.subplots(2, len(kinds), figsize=(style.WIDTH, 7.4), squeeze=False, layout="constrained")
    handles = {}
    for c, kind in enumerate(kinds):
        sub = df[df.process == kind]
        x_all = sub.log_snr.to_numpy()
        finite = x_all[np.isfinite(x_all)]
        left = finite.min() - 0.6 * (finite.max() - finite.min()) / max(len(np.unique(finite)), 1)
        for mid, g in sub.groupby("method"):
            st = style.method_style(mid)
            x = np.where(np.isfinite(g.log_snr), g.log_snr, left)
            k = np.where(g.kappa > 0, g.kappa, np.nan)
            many = len(g) > 20  # the 50-step grid: a marker on every 5th step keeps the lines legible
            kw = st.line(ms=4, lw=1.3, markevery=5 if many else 1)
            (ln,) = axes[0, c].plot(x, k, **kw)
            axes[1, c].plot(x, g.h, **kw)
            handles.setdefault(f"{mid} ({'zo' if st.filled else 'fo'})", ln)
        axes[0, c].set_yscale("log")
        axes[0, c].set_title(f"{kind} ({'SD1.5 50-step DDPM' if kind == 'diffusion' else 'SD3.5 10-step SDE'})")
        axes[0, c].set_ylabel("κ(t) [native units per unit G]")
        axes[1, c].set_ylabel("h(t) = κ/Σκ [fraction]")
        axes[1, c].set_xlabel("log-SNR [nats]" + (" (t = 1 at the left edge)" if kind == "flow" else ""))
    labels = sorted(handles)
    fh, fl = style.family_handles()
    fig.legend([handles[k] for k in labels] + fh, labels + fl, loc="outside lower center", ncol=4,
               fontsize=style.FONT - 1)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=style.DPI)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def run(out_dir) -> tuple[pd.DataFrame, str]:
    """κ(t), h(t) of every method on both real grids; writes influence.{png,pdf} and influence.csv."""
    df = profiles()
    plot(df, out_dir)
    df.to_csv(Path(out_dir) / "influence.csv", index=False)
    return df, CAPTION
