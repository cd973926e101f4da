"""Small builders shared by tests."""
import torch

from rsmbench.core.models import Policy, build_net, frozen_copy
from rsmbench.core.process import make_process


def tiny_policy(kind="diffusion", arch="mlp", dtype=torch.float64, seed=0, cfg_scale=1.0, num_steps=6, **net_kw):
    p = make_process(kind, num_steps=num_steps)
    kw = dict(dim=2, hidden=32, depth=2, temb=16, num_classes=2) if arch == "mlp" else \
        dict(sample_size=8, channels=3, block_out_channels=(16, 32), norm_num_groups=8, num_classes=2)
    kw.update(net_kw)
    net = build_net(arch, p.prediction, seed=seed, dtype=dtype, **kw)
    return Policy(net, p, cfg_scale), Policy(frozen_copy(net), p, cfg_scale)
