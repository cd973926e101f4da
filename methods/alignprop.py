"""AlignProp: reward backprop with randomized truncation and gradient checkpointing.

Paper: Prabhudesai, Goyal, Pathak, Fragkiadaki 2023, "Aligning Text-to-Image Diffusion Models with
Reward Backpropagation", arXiv 2310.03739, §3 (Eq. 3: loss = −r(x_0) backpropagated through the
whole sampling chain; randomized truncated backprop and gradient checkpointing of the UNet to fit
50 steps in memory; §3.2's sampling of the truncation could not be read here).
Code, two versions with two truncation rules (``truncation``):
- ``per_step`` (mihirp1998/AlignProp@a831a5f ``main.py:483-488``, the same at the first release
  @185d154 ``main.py:482``; ``config/align_prop.py`` ``aesthetic()``/``hps()``: ``truncated_backprop_rand
  = True``, ``truncated_backprop_minmax = (0, 50)``): inside the step loop a fresh
  ``timestep = random.randint(k_min, k_max)`` (both ends included) is drawn for every step i and the
  step's noise predictions are detached when i < timestep. Step i is thus trained with probability
  (i − k_min + 1)/(k_max − k_min + 1), independently of the others; the trained set need not be
  contiguous, and a detached step still passes the gradient of later states through the scheduler's
  affine path A_i·x_i. One draw of the mask serves the whole batch, as the loop's one draw per
  step serves its whole micro-batch. A draw that trains no step (a zero update in their loop; chance
  N!/(N+1)^N for (0, N)) is redrawn. That version samples with ``DDIMScheduler.step`` at its default
  η = 0 (``main.py:227-228, 496``: ``stochastic: False`` in its presets) and CFG 7.5.
- ``gaussian`` / ``uniform`` / ``fixed`` (HEAD, mihirp1998/AlignProp@b22918a ``sd_pipeline.py:124-131,
  224-225``; ``config/alignprop_config.py`` ``backprop_strategy = 'gaussian'``, ``backprop_kwargs``
  gaussian mean 42 std 5, uniform (0, 50), fixed 49, ``sample_eta 1.0``): one backprop step b per
  call, ``int(Normal(mean, std).sample())`` resp. ``torch.randint(min, max)`` (max excluded), redrawn
  until 1 ≤ b ≤ N − 1; the steps i ≥ b are trained (K = N − b contiguous last steps). ``fixed`` trains
  the last ``k`` steps (HEAD's ``value 49`` of 50 is k = 1; config/align_prop.py@a831a5f
  ``aesthetic_k1()``: ``trunc_backprop_timestep = 49``).
Draws come from a generator seeded by ``k_seed`` + the batch's first seed and are stored in the batch.
Both versions: ``loss_coeff = 0.01``; the aesthetic loss is |aesthetic_target − r| with target 10
(HPS: 1 − r); the per-sample losses are averaged (``loss.sum()/batch_size``).
Table 1 row: not a Table 1 row (derivations §8.11: "as DRaFT, with random truncation").
Equivalence kind: ``grad_at_behaviour``; the RSM instance is DRaFT's (methods/draft.py) on the
trained steps: Ψ̂/a = ω·λ·B_i·a_{i+1} with a the adjoint of the original's own graph (detached steps
pass A_i·a only), γ = 1, C1·a² = D·K/2 (K = trained steps per sample), C2 = 0, anchor s_θ†,
ω = −φ'(r). Checkpointing changes memory, not the gradient (tests/test_fo_backprop.py).
"""
from __future__ import annotations

import torch

from methods.draft import RewardBackprop
from rsmbench.core.estimators.first import PHI_LOSSES
from rsmbench.core.method import register
from rsmbench.core.params import hp
from rsmbench.errors import TaskError

MAX_DRAWS = 10_000  # rejection sampling of a truncation that trains at least one step
TRUNCATIONS = ("per_step", "gaussian", "uniform", "fixed")


@register
class AlignProp(RewardBackprop):
    id = "alignprop"
    published_processes = ("diffusion",)  # SD1.5 (arXiv 2310.03739 §4; mihirp1998/AlignProp)
    influence_preset = {"diffusion": "aesthetic", "flow": "aesthetic"}
    table_row = {"psi": 'as DRaFT, trained steps drawn per iteration', "gamma": '1 on the trained steps',
                 "c1": 'D·K/2 (native), anchor s_θ†', "c2": '0', "branching": False, "current_state": False}
    paper = "Prabhudesai et al. 2023, arXiv 2310.03739, Eq. 3 and §3 (randomized truncation, checkpointing)"
    table1 = "not a Table 1 row (derivations §8.11)"
    defaults = {"truncation": hp("per_step", choices=TRUNCATIONS), "k_min": hp(0, ge=0),
                "k_max": hp(None, type=int, ge=0),  # None: the process's N
                "k_mean": hp(42.0), "k_std": hp(5.0, ge=0), "k": hp(1, ge=1), "k_seed": hp(0, ge=0),
                "reward_scale": hp(1.0, gt=0), "reward_loss": hp("neg", choices=PHI_LOSSES),
                "reward_target": hp(None, type=float), "stochastic": True, "checkpoint": True}
    presets = {
        "aesthetic": {"truncation": "per_step", "k_min": 0, "k_max": 50, "reward_scale": 0.01,
                      "reward_loss": "abs_target", "reward_target": 10.0, "stochastic": False, "checkpoint": True,
                      "source": "mihirp1998/AlignProp@a831a5f config/align_prop.py aesthetic(): "
                                "truncated_backprop_rand True, truncated_backprop_minmax (0, 50), loss_coeff 0.01, "
                                "aesthetic_target 10; main.py:483-488 (per-step draw), :227-228 (DDIM, η = 0)"},
        "hps": {"truncation": "per_step", "k_min": 0, "k_max": 50, "reward_scale": 0.01, "reward_loss": "neg",
                "stochastic": False, "checkpoint": True,
                "source": "mihirp1998/AlignProp@a831a5f config/align_prop.py hps(): minmax (0, 50), loss_coeff "
                          "0.01, loss 1 − r (the constant does not change the gradient); main.py:483-488"},
        "aesthetic_k1": {"truncation": "fixed", "k": 1, "reward_scale": 0.01, "reward_loss": "abs_target",
                         "reward_target": 10.0, "stochastic": False, "checkpoint": True,
                         "source": "mihirp1998/AlignProp@a831a5f config/align_prop.py aesthetic_k1(): "
                                   "truncated_backprop_rand False, trunc_backprop_timestep 49 of 50 (K = 1)"},
        "aesthetic_head": {"truncation": "gaussian", "k_mean": 42.0, "k_std": 5.0, "reward_scale": 0.01,
                           "reward_loss": "abs_target", "reward_target": 10.0, "stochastic": True, "checkpoint": True,
                           "source": "mihirp1998/AlignProp@b22918a config/alignprop_config.py (backprop_strategy "
                                     "'gaussian', mean 42, std 5; loss_coeff 0.01; aesthetic_target 10; sample_eta "
                                     "1.0), sd_pipeline.py:124-131, 224-225"},
    }

    def check_hparams(self, hp):
        super().check_hparams(hp)
        if hp["k_max"] is not None and hp["k_max"] < hp["k_min"] + (hp["truncation"] == "uniform"):
            raise TaskError(f"k_max {hp['k_max']} must be {'>' if hp['truncation'] == 'uniform' else '>='} "
                            f"k_min {hp['k_min']} ({hp['truncation']} truncation)")

    def trained_steps(self, ctx, seeds) -> torch.Tensor:
        hp, N = ctx.hp, ctx.process.num_steps
        gen = torch.Generator().manual_seed(int(hp["k_seed"]) + int(seeds[0]))
        mode = hp["truncation"]
        steps = torch.arange(N)
        if mode == "fixed":
            return steps >= N - min(int(hp["k"]), N)
        if mode not in ("per_step", "gaussian", "uniform"):
            raise ValueError(f"alignprop: unknown truncation {mode!r}; choose per_step, gaussian, uniform or fixed")
        k_min = int(hp["k_min"])
        k_max = N if hp["k_max"] is None else int(hp["k_max"])
        for _ in range(MAX_DRAWS):
            if mode == "per_step":  # detach step i when i < randint(k_min, k_max), a fresh draw per step
                mask = steps >= torch.randint(k_min, k_max + 1, (N,), generator=gen)
                if mask.any():
                    return mask
                continue
            if mode == "gaussian":
                b = int(torch.normal(float(hp["k_mean"]), float(hp["k_std"]), (1,), generator=gen).item())
            else:  # uniform: torch.randint(min, max), max excluded
                b = int(torch.randint(k_min, k_max, (1,), generator=gen).item())
            if 1 <= b <= N - 1:
                return steps >= b
        raise ValueError(f"alignprop: no {mode} truncation draw trains a step of {N} in {MAX_DRAWS} tries "
                         f"(check k_min/k_max/k_mean against the process's num_steps)")
