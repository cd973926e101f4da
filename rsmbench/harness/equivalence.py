"""The gradient-match harness: original formulation vs RSM instance, on the same batch.

For one method × process: build a tiny random-init θ (a time-conditioned MLP on 2-D data with a
two-prompt condition and classifier-free guidance), a differently initialised reference, and a
frozen behaviour copy θ† = θ; collect a batch with the method's own rollout; compute the
parameter gradients of the original loss and of the RSM loss; compare them:

    max_abs_err = max_j |g_orig,j − g_rsm,j|
    max_rel_err = max_abs_err / max_j |g_orig,j|        (norm-wise, robust to tiny entries)
    cosine      = ⟨g_orig, g_rsm⟩ / (‖g_orig‖·‖g_rsm‖)

An exact kind (``loss``, ``grad_at_behaviour``) passes when max_rel_err ≤ TOL[dtype]
(float64: 1e-9, float32: 1e-4). ``loss`` kinds also compare the loss values, at θ† and at a
perturbed θ. Then, as data on where equivalence ends, the harness takes k = 1…5 Adam steps on
the original loss over the same batch (off-policy) and records the gradient mismatch and the
original's clip fraction after each step. ``approximate`` kinds report their gap and reason.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
import yaml
from tqdm import tqdm

from rsmbench.core import method as registry
from rsmbench.core.method import Context
from rsmbench.core.models import Policy, build_net, frozen_copy
from rsmbench.core.params import did_you_mean
from rsmbench.core.process import make_process
from rsmbench.core.rsm import rsm_loss
from rsmbench.errors import UserError

TOL = {"float64": 1e-9, "float32": 1e-4}
EXACT = ("loss", "grad_at_behaviour")
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# The harness's toy setting: small enough to run every method in seconds.
PROCESS_KW = {"diffusion": dict(num_steps=8, eta=1.0, scheduler=dict(beta_schedule="linear",
                                                                      beta_start=1e-4, beta_end=0.02)),
              "flow": dict(num_steps=8, noise_level=0.7, shift=3.0)}
NET_KW = dict(arch="mlp", dim=2, hidden=32, depth=2, temb=16, num_classes=2)
PROMPTS, SEEDS_PER_PROMPT, CFG_SCALE = 2, 4, 1.5


def toy_reward(x: torch.Tensor, cond=None) -> torch.Tensor:
    """A smooth, differentiable 2-D reward (usable as a black box by zeroth-order methods)."""
    return -0.5 * ((x - 1.0) ** 2).sum(dim=1) + torch.sin(2.0 * x[:, 1])


@dataclass
class Record:
    method: str
    process: str
    kind: str
    dtype: str
    max_abs_err: float
    max_rel_err: float
    cosine: float
    passed: bool
    loss_rel_err: float | None = None
    reason: str = ""
    offpolicy: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def build_context(m, process_kind: str, dtype=torch.float64, seed: int = 0, hp: dict | None = None):
    process = make_process(process_kind, **PROCESS_KW[process_kind])
    pred = process.prediction
    net = build_net(prediction=pred, seed=seed, dtype=dtype, **NET_KW)
    ref_net = frozen_copy(build_net(prediction=pred, seed=seed + 1000, dtype=dtype, **NET_KW))
    ctx = Context(process=process, policy=Policy(net, process, CFG_SCALE),
                  ref=Policy(ref_net, process, CFG_SCALE),
                  behaviour=Policy(frozen_copy(net), process, CFG_SCALE),
                  reward=toy_reward, hp=m.hparams(**(hp or {})), shape=(NET_KW["dim"],))
    return ctx


def collect(m, ctx, seed: int = 0):
    cond = torch.arange(PROMPTS).repeat_interleave(SEEDS_PER_PROMPT)
    seeds = [seed * 10_000 + k for k in range(len(cond))]
    batch = m.collect(ctx, cond, seeds)
    m.prepare(batch, ctx)
    return batch


def flat_grad(loss: torch.Tensor, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def compare(g_orig: torch.Tensor, g_rsm: torch.Tensor) -> dict:
    abs_err = (g_orig - g_rsm).abs().max().item()
    scale = g_orig.abs().max().item()
    denom = (g_orig.norm() * g_rsm.norm()).item()
    return {"max_abs_err": abs_err, "max_rel_err": abs_err / scale if scale > 0 else math.inf,
            "cosine": (g_orig @ g_rsm).item() / denom if denom > 0 else float("nan")}


def both_gradients(m, batch, ctx, perturb=None):
    params = [p for p in ctx.policy.net.parameters() if p.requires_grad]
    loss_o = m.original_loss(batch, ctx)
    g_o = flat_grad(loss_o, params)
    spec = m.rsm_spec(batch, ctx)
    if perturb is not None:
        spec = perturb(spec, ctx)
    loss_r = rsm_loss(ctx.policy, ctx.ref, spec)
    g_r = flat_grad(loss_r, params)
    return g_o, g_r, loss_o.item(), loss_r.item()


def check(method_id: str, process_kind: str, dtype: str = "float64", seed: int = 0, hp: dict | None = None,
          perturb=None, offpolicy_steps: int = 5, lr: float = 3e-2) -> Record:
    """Run the check for one method on one process. `perturb(spec, ctx) -> spec` injects an error."""
    m = registry.get(method_id)
    if process_kind not in m.processes:
        raise ValueError(f"{method_id} does not apply to the {process_kind} process")
    ctx = build_context(m, process_kind, DTYPES[dtype], seed, hp)
    batch = collect(m, ctx, seed)
    g_o, g_r, l_o, l_r = both_gradients(m, batch, ctx, perturb)
    res = compare(g_o, g_r)
    passed = res["max_rel_err"] <= TOL[dtype] and math.isfinite(res["max_rel_err"])
    kind, reason = m.equivalence_kind(ctx.hp)  # of this configuration (e.g. VGG-Flow with its value net)
    rec = Record(method=method_id, process=process_kind, kind=kind, dtype=dtype, passed=passed, reason=reason, **res)
    if kind == "loss":
        rec.loss_rel_err = _loss_gap(m, batch, ctx, perturb, l_o, l_r)
        rec.passed = rec.passed and rec.loss_rel_err <= TOL[dtype]
    rec.offpolicy = _offpolicy_series(m, batch, ctx, perturb, offpolicy_steps, lr)
    if kind not in EXACT:
        rec.passed = True  # approximate rows report their gap; they cannot fail the run
    return rec


def _loss_gap(m, batch, ctx, perturb, l_o, l_r) -> float:
    """Loss-value mismatch at θ† and at a randomly perturbed θ (the larger of the two)."""
    gaps = [abs(l_o - l_r) / max(abs(l_o), 1e-300)]
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for p in ctx.policy.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    _, _, l_o2, l_r2 = both_gradients(m, batch, ctx, perturb)
    gaps.append(abs(l_o2 - l_r2) / max(abs(l_o2), 1e-300))
    with torch.no_grad():  # restore θ = θ†
        for p, q in zip(ctx.policy.net.parameters(), ctx.behaviour.net.parameters()):
            p.copy_(q)
    return max(gaps)


def _offpolicy_series(m, batch, ctx, perturb, steps: int, lr: float) -> list:
    """Off-policy drift: k Adam steps on the original loss over the same batch, θ† fixed."""
    params = [p for p in ctx.policy.net.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    series = []
    for k in range(steps + 1):
        batch.extras.pop("stats", None)
        g_o, g_r, _, _ = both_gradients(m, batch, ctx, perturb)
        stats = batch.extras.get("stats", {})
        series.append({"step": k, **compare(g_o, g_r),
                       "clipfrac": float(stats["clipfrac"]) if "clipfrac" in stats else None})
        if k < steps:
            opt.zero_grad()
            m.original_loss(batch, ctx).backward()
            opt.step()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return series


def run(method_ids=None, processes=("diffusion", "flow"), dtype: str = "float64", progress: bool = False,
        **kw) -> list[Record]:
    """Check every (method, process) pair that applies; `progress`: a bar on stderr, one step per pair."""
    reg = registry.load_all()
    ids = sorted(reg) if not method_ids else method_ids
    for mid in ids:
        if mid not in reg:
            raise KeyError(f"unknown method {mid!r}; choose from {', '.join(sorted(reg))}")
    pairs = [(mid, proc) for mid in ids for proc in processes if proc in reg[mid].processes]
    records = []
    with tqdm(pairs, desc="equiv", unit="check", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for mid, proc in bar:
            bar.set_postfix_str(f"{mid} ({proc})")
            records.append(check(mid, proc, dtype, **kw))
    return records


def table(records: list[Record]) -> str:
    """A fixed-width table of the records, one line each."""
    head = f"{'method':<18}{'process':<11}{'kind':<19}{'dtype':<9}{'max_abs_err':>12}{'max_rel_err':>12}" \
           f"{'cosine':>14}{'rel@k=5':>10}  result"
    lines = [head, "-" * len(head)]
    for r in records:
        last = r.offpolicy[-1]["max_rel_err"] if r.offpolicy else float("nan")
        verdict = ("pass" if r.passed else "FAIL") if r.kind in EXACT else "gap (approximate)"
        lines.append(f"{r.method:<18}{r.process:<11}{r.kind:<19}{r.dtype:<9}{r.max_abs_err:>12.2e}"
                     f"{r.max_rel_err:>12.2e}{r.cosine:>14.10f}{last:>10.2e}  {verdict}")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("equiv", help="check that each method's two formulations give the same gradients")
    p.add_argument("--methods", type=_csv, default=None, help="comma-separated method ids (default: all)")
    p.add_argument("--process", choices=["diffusion", "flow", "all"], default="all",
                   help="the diffusion (DDPM/DDIM) or flow (rectified-flow SDE) process, or both (default: all)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="precision of both gradients; the pass tolerances are set for float64 (default: float64)")
    p.add_argument("--json", dest="json_path", default=None, help="write the records to this JSON file")
    p.add_argument("--preset", default=None,
                   help="check each method at this published preset (without --methods: the methods that have it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter override (YAML value), repeatable, e.g. --hp use_value_net=true; "
                        "without --methods, the methods that declare every given name")
    p.set_defaults(run=_run)


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _hp_overrides(items) -> dict:
    hp = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"rsmbench equiv: --hp expects KEY=VALUE, got {item!r}")
        try:
            hp[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"rsmbench equiv: --hp {key}: cannot parse value {value!r}") from None
    return hp


def selected(method_ids, hp: dict, preset: str | None) -> list[str]:
    """The methods to check, every one's hyperparameters validated first (one-line ``TaskError``s).
    Without --methods, --hp and --preset select the methods that declare every given name / the preset."""
    reg = registry.load_all()
    if method_ids:
        for mid in method_ids:
            if mid not in reg:
                raise UserError(f"unknown method {mid!r}{did_you_mean(mid, reg)}; choose from {', '.join(sorted(reg))}")
        ids = list(method_ids)
    else:
        known = set(registry.COMMON).union(*(m.params for m in reg.values()))
        for key in hp:
            if key not in known:
                raise UserError(f"rsmbench equiv: --hp {key}: no method has this hyperparameter"
                                f"{did_you_mean(key, known)}")
        ids = [i for i in sorted(reg) if set(hp) <= set(registry.COMMON) | set(reg[i].params)
               and (preset is None or preset in reg[i].presets)]
        if not ids:
            wanted = ([f"the preset {preset!r}"] if preset else []) + \
                ([f"every --hp name ({', '.join(hp)})"] if hp else [])
            raise UserError("rsmbench equiv: no method has " + " and ".join(wanted))
    for mid in ids:
        m = reg[mid]()
        m.validate_hparams({**m.hparams(preset), **hp}, where=f"--hp {mid}")
    return ids


def _run(args) -> int:
    procs = ("diffusion", "flow") if args.process == "all" else (args.process,)
    hp = _hp_overrides(args.hp)
    ids = selected(args.methods, hp, args.preset)
    if args.preset:
        hp["preset"] = args.preset
    try:
        records = run(ids, procs, args.dtype, progress=not args.no_progress, hp=hp or None)
    except (KeyError, ValueError) as e:  # an unknown method id or preset
        raise UserError(str(e).strip("'\"")) from None
    if not records:
        raise UserError(f"no selected method applies to process {args.process!r}")
    print(table(records))
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump([r.as_dict() for r in records], f, indent=1)
    failed = [r for r in records if r.kind in EXACT and not r.passed]
    print(f"{len(records) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
