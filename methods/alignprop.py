"""AlignProp: reward backprop with randomized truncation and gradient checkpointing.

Paper: Prabhudesai, Goyal, Pathak, Fragkiadaki 2023, "Aligning Text-to-Image Diffusion Models with
Reward Backpropagation", arXiv 2310.03739, §3 (Eq. 3: loss = −r(x_0) backpropagated through the
whole sampling chain; §3.2 randomized truncated backprop, K ~ Uniform, and gradient
checkpointing of the UNet to fit 50 steps in memory).
Code (mihirp1998/AlignProp ``config/align_prop.py``): ``truncated_backprop_rand=True``,
``truncated_backprop_minmax=(0, 50)``, ``grad_checkpoint=True``, ``loss_coeff=0.01``; the aesthetic
loss is |aesthetic_target − r| with target 10 (HPS: 1 − r). Note: the official loop draws the
cut-off *inside* the step loop (a fresh ``random.randint`` per step); we follow the paper, one K per
iteration, drawn from a generator seeded by the batch's seeds and stored in the batch. K = 0
(no trained step, a no-op update) is excluded: K ∈ [max(1, k_min), min(N, k_max)].
Table 1 row: not a Table 1 row (digest §8.11: "as DRaFT, with random truncation").
Equivalence kind: ``grad_at_behaviour``; the RSM instance is DRaFT's (methods/draft.py) on the
last K steps: Ψ̂/a = ω·λ·B_i·a_{i+1}, γ = 1, C1·a² = D·K/2, C2 = 0, anchor s_θ†, ω = −φ'(r).
Checkpointing changes memory, not the gradient (tests/test_fo_backprop.py).
"""
from __future__ import annotations

from methods.draft import RewardBackprop
from rsmbench.core.diffrollout import draw_truncation
from rsmbench.core.method import register


@register
class AlignProp(RewardBackprop):
    id = "alignprop"
    table_row = {"psi": 'as DRaFT, K random per iteration', "gamma": '1 on the last K steps',
                 "c1": 'D·K/2 (native), anchor s_θ†', "c2": '0', "branching": False, "current_state": False}
    paper = "Prabhudesai et al. 2023, arXiv 2310.03739, Eq. 3 and §3.2 (randomized truncation, checkpointing)"
    table1 = "not a Table 1 row (digest §8.11)"
    defaults = {"k_min": 1, "k_max": None, "k_seed": 0, "reward_scale": 1.0, "reward_loss": "neg",
                "reward_target": None, "stochastic": True, "checkpoint": True}
    presets = {
        "aesthetic": {"k_min": 0, "k_max": 50, "reward_scale": 0.01, "reward_loss": "abs_target",
                      "reward_target": 10.0, "checkpoint": True,
                      "source": "mihirp1998/AlignProp config/align_prop.py aesthetic(): "
                                "truncated_backprop_minmax (0, 50), loss_coeff 0.01, aesthetic_target 10"},
        "hps": {"k_min": 0, "k_max": 50, "reward_scale": 0.01, "reward_loss": "neg", "checkpoint": True,
                "source": "mihirp1998/AlignProp config/align_prop.py hps(): minmax (0, 50), loss_coeff 0.01, "
                          "loss 1 − r (the constant does not change the gradient)"},
    }

    def truncation(self, ctx, seeds) -> int:
        N = ctx.process.num_steps
        k_max = N if ctx.hp["k_max"] is None else min(int(ctx.hp["k_max"]), N)
        k_min = min(max(1, int(ctx.hp["k_min"])), k_max)
        return draw_truncation(int(ctx.hp["k_seed"]) + int(seeds[0]), k_min, k_max)
