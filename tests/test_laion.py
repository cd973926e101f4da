"""The LAION aesthetic predictor's code path with random-init weights (no CLIP / head weights here).

The vision tower has ViT-L/14's layer shapes (width 1024, 16 heads, MLP 4096, patch 14, 224 px,
768-d projection) but 1 of its 24 layers: at full depth, init + one backward take ~2 min on the
2-core build machine. Set RSMBENCH_FULL_CLIP=1 to run the full 24 layers.
"""
import os

import pytest
import torch

import rewards
from rewards import laion_aesthetic as la
from rewards.aesthetic_tiny import LaionHead
from rsmbench.run import fullscale as fs


@pytest.fixture(scope="module")
def scorer():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    depth = 24 if os.environ.get("RSMBENCH_FULL_CLIP") == "1" else 1
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=depth, num_attention_heads=16,
                           patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu")
    torch.manual_seed(0)
    return la.LaionAesthetic(CLIPVisionModelWithProjection(cfg), LaionHead(la.EMBED_DIM))


def test_output_shape_and_differentiable(scorer):
    x = (torch.rand(2, 3, 64, 96) * 2 - 1).requires_grad_(True)  # non-square, small: resized to 224
    r = scorer(x)
    assert r.shape == (2,) and torch.isfinite(r).all()
    assert scorer.features(x.detach()).shape == (2, 768)
    (g,) = torch.autograd.grad(r.sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0
    assert all(not p.requires_grad for p in scorer.parameters())  # frozen reward, gradient to the image only


def test_preprocess_matches_clip_convention():
    x = torch.zeros(1, 3, 300, 400)  # grey in [−1, 1] → 0.5 in [0, 1]
    y = la.clip_preprocess(x)
    assert y.shape == (1, 3, 224, 224)
    expect = (0.5 - torch.tensor(la.CLIP_MEAN)) / torch.tensor(la.CLIP_STD)
    assert torch.allclose(y[0, :, 100, 100], expect, atol=1e-5)


def test_head_loads_safetensors_and_pth(tmp_path, scorer):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in scorer.head.state_dict().items()}
    save_file(sd, str(tmp_path / "head.safetensors"))
    torch.save(sd, tmp_path / "head.pth")
    for name in ("head.safetensors", "head.pth"):
        got = la.load_head_state(str(tmp_path / name))
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_missing_weights_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("RSMBENCH_AESTHETIC_HEAD", str(tmp_path / "nope.pth"))
    with pytest.raises(fs.MissingWeights) as e:
        rewards.get("aesthetic")
    assert "\n" not in str(e.value) and "nope.pth" in str(e.value) and "reward.head=" in str(e.value)
    (tmp_path / "head.pth").write_bytes(b"x")
    with pytest.raises(fs.MissingWeights) as e:
        la.check_weights(head=str(tmp_path / "head.pth"))
    assert "openai/clip-vit-large-patch14" in str(e.value) and "\n" not in str(e.value)
    # the bench's check goes through the reward's check_weights too
    with pytest.raises(fs.MissingWeights):
        fs.check_weights("sd15", model=str(tmp_path), reward="aesthetic")


# ---- preference rewards: code path with random weights, and the missing-weights lines --------------
def test_pickscore_code_path():
    from transformers import CLIPConfig, CLIPModel

    from rewards.preference import PickScore

    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, patch_size=32, image_size=64), projection_dim=8)
    torch.manual_seed(0)
    r = PickScore(CLIPModel(cfg), fs.clip_tokenizer(), prompts=["a cat", "a dog"])
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    s = r(x, torch.tensor([0, 1]))
    assert s.shape == (2,) and torch.isfinite(s).all()
    (g,) = torch.autograd.grad(s.sum(), x)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="needs prompts"):
        PickScore(CLIPModel(cfg), fs.clip_tokenizer())(x)


@pytest.mark.parametrize("name,needle", [("pickscore", "yuvalkirstain/PickScore_v1"),
                                         ("hpsv2", "open_clip"), ("imagereward", "image-reward")])
def test_preference_missing_one_line(tmp_path, monkeypatch, name, needle):
    import importlib.util

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    if name != "pickscore" and importlib.util.find_spec({"hpsv2": "open_clip", "imagereward": "ImageReward"}[name]):
        needle = {"hpsv2": "HPS_v2.1_compressed.pt", "imagereward": "ImageReward.pt"}[name]
    with pytest.raises(fs.MissingWeights) as e:
        rewards.get(name)
    assert "\n" not in str(e.value) and needle in str(e.value)
    with pytest.raises(fs.MissingWeights):
        rewards.REWARDS[name].check_weights()
