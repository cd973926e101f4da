"""The full-scale path (SD1.5 / SD3.5) on tiny random-init pipelines, CPU, offline.

One training step of a zeroth-order (``reinforce_kl``) and a first-order (``draft``, K = 1) method
through an SD1.5-shaped and an SD3-shaped pipeline, in both formulations, float64: the gradients of
the original and the RSM loss over the LoRA parameters agree to max_rel_err ≤ 1e-9 (the harness's
float64 tolerance), and an injected sign flip of Ψ̂ or a doubled C1 is detected (rel. err > 1e-3).
"""
from dataclasses import replace

import pytest
import torch

from rsmbench.core.method import get
from rsmbench.core.rsm import rsm_loss
from rsmbench.harness import equivalence as eq
from rsmbench.run import fullscale as fs

TOL = eq.TOL["float64"]
PROMPTS = ["a photo of a cat", "a dog"]


class SmoothReward:
    """A differentiable stand-in pixel reward on images in [−1, 1]."""

    name, title, differentiable = "smooth", "smooth", True

    def __call__(self, x, cond=None):
        return -((x - 0.2) ** 2).flatten(1).mean(1) * 10 + x[:, 0].flatten(1).mean(1)


@pytest.fixture(scope="module", params=[("diffusion", "sd15"), ("flow", "sd35")], ids=["sd15", "sd35"])
def pipe_kind(request):
    kind, prof = request.param
    return kind, prof


def _setup(method_id, kind, prof, **hp):
    m = get(method_id)
    pipe = fs.random_pipeline(kind, seed=0)
    F = fs.build(m, prof, SmoothReward(), prompts=PROMPTS, pipe=pipe, precision="fp64", dtype=torch.float64,
                 device="cpu", num_steps=2, resolution=8, hp=hp)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move θ away from the reference (LoRA B starts at 0)
        for p in F.net.lora_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    F.sync_behaviour()
    # group advantages need two samples per prompt; the pathwise method needs one
    cond = torch.tensor([0, 0]) if m.order == "zeroth" else torch.tensor([0, 1])
    batch = m.collect(F.ctx, cond, [11, 12, 13, 14][:len(cond)])
    m.prepare(batch, F.ctx)
    return m, F, batch


@pytest.mark.parametrize("method_id,hp", [("reinforce_kl", {}), ("draft", {"k": 1})], ids=["zeroth", "first"])
def test_one_step_both_formulations(pipe_kind, method_id, hp):
    kind, prof = pipe_kind
    m, F, batch = _setup(method_id, kind, prof, **hp)
    assert F.ctx.shape == (4, 4, 4) and F.net.num_classes == 2
    g_o, g_r, l_o, l_r = eq.both_gradients(m, batch, F.ctx)
    assert g_o.numel() == sum(p.numel() for p in F.net.lora_parameters())  # LoRA only
    assert g_o.norm() > 0
    res = eq.compare(g_o, g_r)
    assert res["max_rel_err"] <= TOL, res
    # injected errors are detected on the same batch
    spec = m.rsm_spec(batch, F.ctx)
    params = F.net.lora_parameters()
    for name, bad in {"psi sign": replace(spec, psi=-spec.psi), "c1 x2": replace(spec, c1=2 * spec.c1)}.items():
        g_bad = eq.flat_grad(rsm_loss(F.ctx.policy, F.ctx.ref, bad), params)
        assert eq.compare(g_o, g_bad)["max_rel_err"] > 1e-3, name
    # one optimizer step on the LoRA weights moves θ and leaves the reference untouched
    x = batch.rows.x[:2]
    ref_before = F.ctx.ref(x, batch.rows.step[:2], batch.rows.cond[:2])
    opt = torch.optim.SGD(F.net.lora_parameters(), lr=1e-1)
    opt.zero_grad()
    m.original_loss(batch, F.ctx).backward()
    opt.step()
    assert torch.equal(F.ctx.ref(x, batch.rows.step[:2], batch.rows.cond[:2]), ref_before)
    assert not torch.equal(F.ctx.policy(x, batch.rows.step[:2], batch.rows.cond[:2]),
                           F.ctx.behaviour(x, batch.rows.step[:2], batch.rows.cond[:2]))


def test_views_and_prompts():
    m = get("reinforce_kl")
    F = fs.build(m, "sd35", SmoothReward(), prompts=PROMPTS, pipe=fs.random_pipeline("flow"), precision="fp64",
                 dtype=torch.float64, device="cpu", num_steps=2, resolution=8)
    x = torch.randn(2, *F.ctx.shape, dtype=torch.float64)
    c = torch.tensor([0, 1])
    # LoRA B = 0 at init: θ = reference = behaviour exactly
    assert torch.equal(F.ctx.policy(x, 1, c), F.ctx.ref(x, 1, c))
    with torch.no_grad():
        for p in F.net.lora_parameters():
            p.add_(0.1)
    assert not torch.allclose(F.ctx.policy(x, 1, c), F.ctx.ref(x, 1, c))
    assert not torch.allclose(F.ctx.policy(x, 1, c), F.ctx.behaviour(x, 1, c))  # θ† is the old snapshot
    F.sync_behaviour()
    assert torch.equal(F.ctx.policy(x, 1, c), F.ctx.behaviour(x, 1, c))
    # prompt ids index the prompts' embeddings; the null id is the empty prompt; CFG changes the output
    assert F.net.embeds.shape[0] == len(PROMPTS) + 1
    assert not torch.equal(F.net.embeds[0], F.net.embeds[-1])
    o_uncond = F.net(x, F.ctx.process.model_t[1:2].to(x.dtype), torch.full_like(c, F.net.num_classes))
    assert not torch.allclose(o_uncond, F.ctx.policy(x, 1, c))
    # profile metadata: SD3.5 grid and CFG, LoRA defaults by order
    assert F.ctx.policy.cfg_scale == 4.5 and F.extra["lora"]["r"] == 32 and F.extra["lora"]["alpha"] == 64
    assert F.ctx.process.kind == "flow" and F.ctx.process.scheduler.config.shift == 3.0


def test_published_grids():
    from rsmbench.core.process import make_process

    sd15 = fs.get_profile("sd15")
    p = make_process("diffusion", num_steps=sd15.num_steps["zeroth"], **sd15.process)
    assert p.timesteps[0].item() == 981 and p.timesteps[-1].item() == 1 and p.eta == 1.0  # derivations §2.2
    sd35 = fs.get_profile("sd35")
    p = make_process("flow", num_steps=10, shift=3.0, **sd35.process)
    ref = [1.0, 0.96, 0.913, 0.857, 0.790, 0.706, 0.601, 0.463, 0.275, 0.003, 0.0]  # derivations §2.3
    # diffusers' FlowMatchEuler grid (what SD3's pipeline and Flow-GRPO use); its last non-zero σ is
    # 0.0089 where the rounded formula of docs/derivations.md §5.3 gives 0.003
    assert torch.allclose(p.sigmas[:9].float(), torch.tensor(ref[:9]), atol=4e-3)
    assert 0 < p.sigmas[9] < 0.01 and p.sigmas[10] == 0
    assert sd15.cfg_scale["zeroth"] == 5.0 and sd35.cfg_scale["zeroth"] == 4.5 and sd35.cfg_scale["first"] == 5.0


def test_mixed_precision_logprob_consistency():
    """bf16 weights + autocast: the training-time recomputation of the rollout's log-probs at θ = θ†
    gives ratio 1 (the Flow-GRPO FAQ check), because process math is fp32 on the fp32-cast output."""
    m = get("reinforce_kl")
    F = fs.build(m, "sd15", SmoothReward(), prompts=PROMPTS, pipe=fs.random_pipeline("diffusion"), precision="bf16",
                 dtype=torch.float32, device="cpu", num_steps=2, resolution=8)
    assert next(F.pipe.unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in F.net.lora_parameters())
    batch = m.collect(F.ctx, torch.tensor([0, 1]), [3, 4])
    rows, p = batch.rows, F.ctx.process
    with torch.no_grad():
        out = F.ctx.policy(rows.x, rows.step, rows.cond)
    assert out.dtype == torch.float32
    lp = p.log_prob(rows.x_next, p.mean(rows.x, out, rows.step), rows.step)
    ratio = torch.exp(lp - rows.log_prob)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), ratio


def test_clip_tokenizer_is_openai():
    tok = fs.clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_prompt_lists():
    animals = fs.load_prompts("simple_animals")
    assert len(animals) == 45 and len(set(animals)) == 45 and animals[:3] == ["cat", "dog", "horse"]
    inet = fs.load_prompts("imagenet_animals")
    # DDPO's prompt is the whole stripped line of imagenet_classes.txt, synonyms included
    # (kvablack/ddpo-pytorch@1958463 ddpo_pytorch/prompts.py:23,36; assets/imagenet_classes.txt:1-398)
    assert len(inet) == 398 and inet[0] == "tench, Tinca tinca"
    assert inet[397] == "puffer, pufferfish, blowfish, globefish"


def test_missing_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(fs.MissingWeights) as e:
        fs.check_weights("sd15")
    msg = str(e.value)
    assert "\n" not in msg and "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "model=" in msg
    assert fs.MissingWeights.exit_code == 2
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(fs.MissingWeights, match="model_index.json"):
        fs.check_weights("sd35", model=str(tmp_path / "notamodel"))
    with pytest.raises(ValueError, match="unknown full-scale profile"):
        fs.get_profile("sdxl")


def test_local_directory_roundtrip(tmp_path):
    """model=<dir>: a pipeline saved with save_pretrained loads offline through the profile."""
    pipe = fs.random_pipeline("diffusion")
    pipe.save_pretrained(tmp_path / "sd")
    assert fs.check_weights("sd15", model=str(tmp_path / "sd")) == str(tmp_path / "sd")
    loaded = fs.load_pipeline("sd15", model=str(tmp_path / "sd"))
    a = dict(pipe.unet.named_parameters())["conv_in.weight"]
    assert torch.equal(dict(loaded.unet.named_parameters())["conv_in.weight"], a)


def test_missing_weights_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert fs.main(["--profile", "sd35"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stabilityai/stable-diffusion-3.5-medium" in err
    monkeypatch.setenv("RSMBENCH_AESTHETIC_HEAD", str(tmp_path / "head.pth"))
    pipe = fs.random_pipeline("diffusion")
    pipe.save_pretrained(tmp_path / "sd")
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert fs.main(["--profile", "sd15", "--model", str(tmp_path / "sd"), "--reward", "aesthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "head.pth" in err
