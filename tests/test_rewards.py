"""The image-task rewards: JPEG (in)compressibility (black box) and aesthetic (tiny) (differentiable)."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import aesthetic_tiny, jpeg


def _direct_kb(x: torch.Tensor, size: int) -> list[float]:
    """Pillow directly: DDPO's uint8 conversion, nearest resize to `size`, JPEG quality 95."""
    u = ((x + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for im in u:
        buf = io.BytesIO()
        Image.fromarray(im).resize((size, size), Image.NEAREST).save(buf, "JPEG", quality=95)
        out.append(len(buf.getvalue()) / 1000)
    return out


@pytest.mark.parametrize("hw", [32, 64])
def test_jpeg_matches_direct_pillow_encode(hw):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, hw, hw, generator=g) * 2 - 1
    x[0] = 0.3  # a flat image next to two noise images
    comp, incomp = rewards.get("compressibility"), rewards.get("incompressibility")
    expected = _direct_kb(x, max(hw, 64))  # 32 px is nearest-upsampled ×2 to 64 px
    nbytes = [round(e * 1000) for e in expected]
    # same byte count (the reward is ∓ bytes/1000 in float32: compare after rounding to bytes)
    assert [round(-v * 1000) for v in comp(x).tolist()] == nbytes
    assert [round(v * 1000) for v in incomp(x).tolist()] == nbytes
    assert incomp(x)[0] < incomp(x)[1]  # flat compresses better than noise


def test_jpeg_is_black_box_only():
    r = rewards.get("compressibility")
    assert r.differentiable is False and "JPEG" in r.title
    x = torch.zeros(2, 3, 32, 32, requires_grad=True)
    assert not r(x).requires_grad
    with pytest.raises(ValueError, match="images"):
        r(torch.zeros(4, 2))


@pytest.fixture(scope="module")
def aesthetic():
    return rewards.get("aesthetic_tiny")


def test_aesthetic_is_differentiable_wrt_the_input(aesthetic):
    assert aesthetic.differentiable is True
    assert aesthetic.title == "aesthetic (tiny): learned image-quality head"
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_()
    r = aesthetic(x)
    assert r.shape == (2,) and torch.isfinite(r).all()
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and (g.abs() > 0).float().mean() > 0.5
    # each sample's reward depends on its own image only (per-sample gradients)
    (g0,) = torch.autograd.grad(aesthetic(x)[0], x)
    assert g0[1].abs().max() == 0 and g0[0].abs().max() > 0


def test_aesthetic_features_and_dtype(aesthetic):
    x = torch.zeros(3, 3, 32, 32, dtype=torch.float64)
    f = aesthetic.features(x)
    assert f.shape == (3, aesthetic_tiny.FEAT_DIM) and f.dtype == torch.float64
    assert aesthetic(x).dtype == torch.float64
    # the JPEG rewards share the same feature space
    assert torch.allclose(rewards.get("compressibility").features(x), f)


def test_aesthetic_ranks_clean_patches_above_degraded(aesthetic):
    """Held-out patches vs. the same patches at full severity of each training degradation.
    Measured with the committed head: pair accuracy .75/1.0/.72/.91/.75 (blur/noise/jpeg/contrast/
    downup), .83 overall; a random head would sit near .5."""
    from rsmbench.data.images import patches, to_uint8

    x, _ = patches("heldout", n_per_photo=4, seed=5)
    u = to_uint8(x)
    with torch.no_grad():
        clean = aesthetic(x)
        wins = []
        for kind in aesthetic_tiny.RECIPE["degradations"]:
            rng = np.random.default_rng(0)
            xd = np.stack([aesthetic_tiny.degrade(im, [kind], [1.0], rng) for im in u])
            bad = aesthetic(torch.from_numpy(xd).permute(0, 3, 1, 2).float() / 127.5 - 1)
            assert clean.mean() > bad.mean(), kind
            wins.append((clean > bad).float())
    assert torch.cat(wins).mean() >= 0.7


def test_head_hash_is_verified(tmp_path):
    head, card = tmp_path / "head.safetensors", tmp_path / "head.json"
    shutil.copy(aesthetic_tiny.HEAD_PATH, head)
    shutil.copy(aesthetic_tiny.CARD_PATH, card)
    aesthetic_tiny.load_head(str(head), str(card))  # intact copy loads
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(aesthetic_tiny.WeightsError) as e:
        aesthetic_tiny.load_head(str(head), str(card))
    msg = str(e.value)
    assert "\n" not in msg and "sha256" in msg and "python -m rewards.aesthetic_tiny" in msg
    with pytest.raises(aesthetic_tiny.WeightsError, match="missing"):
        aesthetic_tiny.load_head(str(tmp_path / "nope.safetensors"), str(card))


def test_head_card_records_recipe_and_hash():
    card = json.load(open(aesthetic_tiny.CARD_PATH))
    assert card["sha256"] == aesthetic_tiny.sha256(aesthetic_tiny.HEAD_PATH)
    assert card["recipe"]["seed"] == aesthetic_tiny.RECIPE["seed"]
    assert card["metrics"]["heldout_ranking_accuracy"] > 0.7  # measured .749 (card)


@pytest.mark.parametrize("spec", [{"name": "compressibility"}, {"name": "compressibility", "cfg": None},
                                  {"name": "compressibility", "cfg": {}}])
def test_task_reward_without_cfg_uses_the_defaults(spec):
    from omegaconf import OmegaConf

    from rsmbench.run import tasks

    r = tasks.build_reward(OmegaConf.create({"reward": spec}))
    assert isinstance(r, jpeg.JpegReward) and r.quality == 95


def test_task_reward_unknown_name_is_a_task_error():
    from omegaconf import OmegaConf

    from rsmbench.run import tasks

    with pytest.raises(tasks.TaskError, match="unknown reward 'nope'; choose from .*compressibility"):
        tasks.build_reward(OmegaConf.create({"reward": {"name": "nope", "cfg": {}}}))
