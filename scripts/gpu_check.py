"""GPU check of the full-scale path with random-init components of the published sizes, 512 px.

For each profile (sd15: SD1.5 UNet 860 M; sd35: SD3.5-Medium MMDiT 2.5 B) and each method family
(zeroth-order: reinforce_kl with the JPEG compressibility reward; first-order: draft K = 1 with the
LAION aesthetic predictor, CLIP ViT-L/14 of the real shape, random weights), one collection and one
training step of both formulations (LoRA, bf16 base weights, gradient checkpointing, micro-batches of
`--rows` rows). Records wall time per phase, peak CUDA memory, and the original-vs-RSM gradient gap
(bf16, so only approximate), and writes them to a JSON file.

    python scripts/gpu_check.py --out results/gpu_check.json [--profiles sd15,sd35] [--families zeroth,first]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rsmbench.core.method import formulation_loss, get  # noqa: E402
from rsmbench.harness.equivalence import compare  # noqa: E402
from rsmbench.run import fullscale as fs  # noqa: E402
from rsmbench.run.train import row_chunks  # noqa: E402

FAMILIES = {"zeroth": ("reinforce_kl", {}), "first": ("draft", {"k": 1})}
STEPS = {"sd15": {"zeroth": 20, "first": 20}, "sd35": {"zeroth": 10, "first": 10}}


def pixel_reward(family: str, device):
    if family == "zeroth":
        import rewards

        return rewards.get("compressibility")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from rewards.aesthetic_tiny import LaionHead
    from rewards.laion_aesthetic import EMBED_DIM, LaionAesthetic

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu")
    with torch.device(device):
        return LaionAesthetic(CLIPVisionModelWithProjection(cfg), LaionHead(EMBED_DIM)).to(device)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def grads_of(method, batch, ctx, formulation: str, rows_per_micro: int):
    params = ctx.policy.net.lora_parameters()
    for p in params:
        p.grad = None
    for mb, share in row_chunks(batch, rows_per_micro):  # the training loop's gradient accumulation
        (formulation_loss(method, formulation, mb, ctx) * share).backward()
    return torch.cat([p.grad.reshape(-1).float() for p in params])


def run_one(profile: str, family: str, args, device) -> dict:
    kind = fs.get_profile(profile).kind
    mid, hp = FAMILIES[family]
    m = get(mid)
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    t0 = time.time()
    pipe = fs.random_pipeline(kind, size="full", device=device)
    F = fs.build(m, profile, pixel_reward(family, device), prompts="simple_animals", pipe=pipe, hp=hp,
                 precision=args.precision, device=device, num_steps=STEPS[profile][family], resolution=512)
    sync()
    rec = {"profile": profile, "family": family, "method": mid, "num_steps": F.ctx.process.num_steps,
           "cfg_scale": F.ctx.policy.cfg_scale, "lora": {k: v for k, v in F.extra["lora"].items() if k != "targets"},
           "lora_params": sum(p.numel() for p in F.net.lora_parameters()), "build_s": time.time() - t0}
    cond = torch.zeros(args.samples, dtype=torch.long)  # one prompt, `samples` seeds: one advantage group
    t0 = time.time()
    batch = m.collect(F.ctx, cond, list(range(args.samples)))
    m.prepare(batch, F.ctx)
    sync()
    rec["collect_s"], rec["rows"] = time.time() - t0, len(batch.rows)
    g = {}
    for form in ("original", "rsm"):
        t0 = time.time()
        g[form] = grads_of(m, batch, F.ctx, form, args.rows)
        sync()
        rec[f"train_{form}_s"] = time.time() - t0
    rec.update({f"grad_{k}": v for k, v in compare(g["original"], g["rsm"]).items()})
    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del F, pipe, batch
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/gpu_check.json")
    ap.add_argument("--profiles", default="sd15,sd35")
    ap.add_argument("--families", default="zeroth,first")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "precision": args.precision, "resolution": 512, "runs": []}
    for profile in args.profiles.split(","):
        for family in args.families.split(","):
            try:
                rec = run_one(profile, family, args, device)
            except Exception as e:  # keep going: one failed family must not hide the others
                rec = {"profile": profile, "family": family, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            print(json.dumps(rec), flush=True)
            out["runs"].append(rec)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    return 0 if all("error" not in r for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
