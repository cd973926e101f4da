"""The in-package photo patch source (rsmbench.data.images): deterministic, in [−1, 1], split held out."""
import numpy as np
import pytest
import torch

from rsmbench.data import images


def test_patches_deterministic_given_seed():
    a, ya = images.patches("train", n_per_photo=6, seed=3)
    b, yb = images.patches("train", n_per_photo=6, seed=3)
    c, _ = images.patches("train", n_per_photo=6, seed=4)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)


def test_patches_shape_range_and_labels():
    x, y = images.patches("heldout", n_per_photo=5, size=32, seed=0)
    k = len(images.PHOTOS)
    assert x.shape == (5 * k, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.5 and x.max() > 0.5  # real photo content, not a constant
    assert torch.equal(torch.bincount(y, minlength=k), torch.full((k,), 5))
    assert len(images.prompts()) == k


def test_uint8_round_trip():
    u = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x = u.float() / 127.5 - 1
    assert np.array_equal(images.to_uint8(x), u.permute(0, 2, 3, 1).numpy())


def test_train_and_heldout_regions_do_not_overlap():
    # the train region is the top TRAIN_FRAC of rows, the held-out region the rest: together they
    # tile the photo (checked at the first scale, where both have the same resize factor)
    name = images.PHOTOS[0]
    h = images.load_photo(name).shape[0]
    cut = int(round(images.TRAIN_FRAC * h))
    assert 0 < cut < h
    tr, ho = images._regions(name, "train")[-1], images._regions(name, "heldout")[-1]
    f = images.SCALES[-1] / min(images.load_photo(name).shape[:2])
    assert tr.shape[0] == round(cut * f) and ho.shape[0] == round((h - cut) * f)


def test_unknown_split_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        images.patches("test")


def test_image_tasks_share_the_generators():
    """compressibility / incompressibility reuse aesthetic's base models: same data and processes."""
    from omegaconf import OmegaConf

    from rsmbench.run import tasks

    a = tasks.load("aesthetic")
    assert a.data.source == "photo_patches" and a.title == "aesthetic (tiny): learned image-quality head"
    for name in ("compressibility", "incompressibility"):
        t = tasks.load(name)
        assert OmegaConf.to_container(t.processes) == OmegaConf.to_container(a.processes)
        assert OmegaConf.to_container(t.data) == OmegaConf.to_container(a.data)
        assert t.reward.name == name and t.reward.cfg.quality == 95
    assert len(a.prompts.names) == len(images.PHOTOS)


def test_data_source_is_registered_for_the_pretrainer():
    from rsmbench.data.sources import data_source

    src = data_source("photo_patches", "rsmbench.data.images", n_per_photo=3, seed=0)
    x, c = src.sample(5, torch.Generator().manual_seed(0))
    x2, c2 = src.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 32, 32) and torch.equal(x, x2) and torch.equal(c, c2)


def test_committed_generators_match_the_task_file():
    """The checkpoints' logged config (sidecar JSON, hash-checked on load) is the task file's."""
    import json

    from omegaconf import OmegaConf

    from rsmbench.run import tasks

    cfg = tasks.load("aesthetic")
    for kind in ("flow", "diffusion"):
        pc = cfg.processes[kind]
        meta = json.loads(tasks.resolve_path(pc.model.checkpoint).with_suffix(".json").read_text())["config"]
        assert meta["pretrain"] == OmegaConf.to_container(pc.pretrain)
        assert meta["net"] == OmegaConf.to_container(pc.model.net)
        assert meta["data"] == OmegaConf.to_container(cfg.data)
        assert meta["process_kwargs"] == OmegaConf.to_container(pc.process)


def test_photo_patch_unet_attention_only_where_declared():
    """The photo-patch generators' net (tasks/_photo_patches.yaml): attention_levels=0 leaves the down
    and up blocks attention-free, the middle block keeps its self-attention; the default keeps
    attention at every level but the finest; an impossible level count is refused."""
    from diffusers.models.attention_processor import Attention

    from rsmbench.core.models import TinyUNet

    kw = dict(sample_size=16, channels=3, block_out_channels=(8, 16, 32), norm_num_groups=8, num_classes=2)
    lean = TinyUNet(**kw, attention_levels=0, mid_attention=True)
    assert [type(b).__name__ for b in lean.unet.down_blocks] == ["DownBlock2D"] * 3
    assert [type(b).__name__ for b in lean.unet.up_blocks] == ["UpBlock2D"] * 3
    assert sum(isinstance(m, Attention) for m in lean.modules()) == 1  # the middle block's
    assert sum(isinstance(m, Attention) for m in TinyUNet(**kw, attention_levels=0, mid_attention=False)
               .modules()) == 0
    default = TinyUNet(**kw)
    assert [type(b).__name__ for b in default.unet.down_blocks] == ["DownBlock2D"] + ["AttnDownBlock2D"] * 2
    x = torch.randn(2, 3, 16, 16)
    assert lean(x, torch.tensor(0.5), torch.tensor([0, 1])).shape == x.shape
    with pytest.raises(ValueError, match="attention_levels"):
        TinyUNet(**kw, attention_levels=3)
