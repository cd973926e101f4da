"""Branch-GRPO: tree rollouts with shared prefixes, reward fusion and depth-wise advantages.

Paper: Li, Wang et al. 2025, "BranchGRPO: Stable and Efficient GRPO with Structured Branching in
Diffusion Models", arXiv 2509.06040: branching rollouts (the SDE sampler splits at chosen steps into
children that share their prefix), reward fusion up the tree, advantages standardised per depth,
width/depth pruning of the trained transitions; the loss is DanceGRPO's PPO-clip (arXiv 2505.07818,
Eq. 6–8) on every tree edge. Digest §8.8.
Code: Fredreic1849/BranchGRPO@ffc3c90 ``fastvideo/train_branchgrpo_flux.py`` (most likely the official
release: the README carries the paper's title, the headers are ByteDance's; not confirmed) and its
launch script ``scripts/finetune/finetune_flux_branchgrpo_8gpus.sh``@19fbb9f. As this file follows it:
  - tree (``run_tree_sample_step``:354-542): every step of every node is a tree edge; at a split step
    (``--tree_split_points 0,3,6,9``, 2 children each, 20 steps: 16 leaves) each child draws
    x' = μ + σ·(s·ξ) with s = ``--tree_split_noise_scale`` 4.0 while its log-prob keeps σ
    (``flux_step_with_split``:265-281; ``rsmbench.core.tree.branching_tree``);
  - fusion (``compute_node_rewards_from_leaves``:545-652): ``mean`` = the uniform mean of the node's leaf
    rewards (the script's ``TREE_PROB_WEIGHTED="false"``), or ``prob_weighted``: recursively, the softmax
    of the children's split-edge ⟨log p⟩ (α = 1) weights the children's values (``tree.fuse_rewards``);
  - advantages (``compute_hierarchical_advantages_by_depth``:655-687, called per tree :1149-1180): among
    the nodes of one tree at one depth, (v − mean)/(std + 1e-8) with torch's unbiased std, 0 if the depth
    has one node or std < 1e-6; every edge parent → child is trained with the child's advantage, clamped
    to ±``adv_clip_max`` 5 in the loss (:1199-1218, :1546-1547). A node of this file's tree is a segment
    of the authors' chain of one-step nodes; all of them carry its value, so per tree and depth = per
    root and segment level here;
  - depth pruning (:1268-1322): drops the edges whose child depth (= step + 1) is listed in
    ``depth_pruning``, with the optional sliding window (``depth_pruning_slide``: the window moves one
    depth shallower every ``depth_pruning_slide_interval`` training steps, up to ``depth_pruning_stop_depth``,
    default the last split step);
  - width pruning (:1324-1477), after depth pruning, only on edges after the last split (step > last
    split step): mode 1 keeps, within each last-split branch, the first max(1, ⌊n·ratio⌋) edges by
    advantage (a stable sort: ties keep the code's order); mode 2 keeps the best ⌊k/2⌋ and the worst
    k − ⌊k/2⌋ of all of them, k = max(2, ⌊n·ratio⌋), ratio ``--width_pruning_ratio`` 0.5; the released
    script has both prunings off;
  - PPO clip ``--clip_range 1e-3`` (argparse default 1e-4), on the per-element-mean log-prob ratio.
The split-edge noise at θ† (``split_noise_scale`` s): both log-probs use the step's σ, so ρ = 1 and the
clip is inactive as on any edge, but the edge's gradient −A·∇⟨log N(x'; μ_θ, σ²)⟩ has x' − μ = s·σ·ξ:
it is s times an unscaled edge's, and s² = 16 times the score-function gradient of the law the child was
drawn from (N(μ, s²σ²)): not an unbiased REINFORCE estimate of that law. The RSM instance reproduces it
exactly because its Ψ̂ uses the stored residual (x' − μ)/σ = s·ξ. Off θ†, the ξ-linear part of log ρ
moves s times faster on split edges, so the clip binds there first.
Table 1 row: "Branch-GRPO" (branching: Yes). Digest §7.2, §8.8.
Equivalence kind: ``grad_at_behaviour``: per edge n → m the first-step gradient is −A_m·∇⟨log p_θ(m|n)⟩
at θ = θ† (ρ = 1, clip inactive); pruning selects rows and is applied to both formulations.
Deliberate deviations: the authors' FLUX sampler is DanceGRPO's η-SDE (std η·√Δt, ``--eta 0.3``); here
the tree runs on the process's SDE (``sde_window`` an optional fixed window, not the code's
``--mix_ode_sde_tree`` blocks). ``--init_same_noise`` (one initial noise for all trees of a step) is not
modelled: every root has its own seed. The code steps the optimizer every ``gradient_accumulation_steps``
(12) shuffled edges, each edge's loss divided by 12·⌊edges/trees⌋ (:1500-1596); here the training loop
takes the mean over all kept edges (the loop owns the optimizer cadence). ``--pruning_step_ratio`` is 1
(always prune). The sliding depth window counts training steps on the method object (a resumed run
restarts the count unless the loop restores ``state_dict``).

Rows: every stochastic transition of every node (a shared prefix is ONE row set, not copied per
leaf); a row of node m carries A_m.
Original (per row, mean over rows, ⟨·⟩ per-element means):
    ρ = exp(⟨log p_θ⟩ − ⟨log p_θ†⟩),  L = max(−A_m·ρ, −A_m·clip(ρ, 1 ± ε))
RSM instance (derivations §8.5, §8.8): Ψ̂/a = −A_m·ξ/w_t, γ = 1, C1·a² = w_t²/2, C2 = 0, anchor s_θ†.
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.method import Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rsm import RSMSpec
from rsmbench.core.tree import (
    FUSIONS,
    GROUP_STRATEGIES,
    branching_tree,
    fuse_rewards,
    node_advantages,
    sde_window,
    to_batch,
)
from rsmbench.errors import TaskError

WIDTH_MODES = (0, 1, 2)


@register
class BranchGRPO(Method):
    id = "branch_grpo"
    processes = ("diffusion", "flow")
    published_processes = ("flow",)  # FLUX.1-dev (BranchGRPO scripts/finetune/finetune_flux_branchgrpo_8gpus.sh)
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A_node·ξ, A from fused descendant leaves, per-depth normalised', "gamma": '1',
                 "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": 'PPO clip', "branching": True, "current_state": False}
    paper = ("BranchGRPO: Li, Wang et al. 2025, arXiv 2509.06040 (branching, reward fusion, depth-wise "
             "advantages, pruning); DanceGRPO PPO-clip: arXiv 2505.07818, Eq. 6-8; derivations §8.8")
    table1 = "Branch-GRPO"
    kind_reason = "θ = θ† (ρ = 1, clip inactive) on every tree edge; pruning is row selection, shared by both"
    defaults = {"split_steps": hp([1, 4], items=hp(0, ge=0)), "ks": hp([2, 2], items=hp(0, ge=1)),
                "split_noise_scale": hp(4.0, gt=0),
                "sde_window": hp(None, type=list, items=hp(None, type=int, ge=0)),  # [start, end): SDE steps
                "fusion": hp("mean", choices=FUSIONS), "group_strategy": hp("seed", choices=GROUP_STRATEGIES),
                "clip_range": hp(1e-3, gt=0), "adv_clip_max": hp(5.0, gt=0, null=True), "adv_eps": hp(1e-8, gt=0),
                "adv_unbiased": True, "adv_zero_std": hp(1e-6, ge=0, null=True),
                "width_pruning_mode": hp(0, choices=WIDTH_MODES), "width_pruning_ratio": hp(0.5, gt=0, le=1),
                "depth_pruning": hp([], items=hp(0, ge=1)), "depth_pruning_slide": False,
                "depth_pruning_slide_interval": hp(1, ge=1), "depth_pruning_stop_depth": hp(None, type=int, ge=0)}
    strength = "clip_range"  # the PPO clip ε
    influence_preset = {"diffusion": "branchgrpo", "flow": "branchgrpo"}
    presets = {
        "branchgrpo": {"split_steps": [0, 3, 6, 9], "ks": [2, 2, 2, 2], "split_noise_scale": 4.0, "fusion": "mean",
                       "group_strategy": "seed", "clip_range": 1e-3, "adv_clip_max": 5.0,
                       "width_pruning_mode": 0, "depth_pruning": [],
                       "source": "Fredreic1849/BranchGRPO@19fbb9f scripts/finetune/finetune_flux_branchgrpo_8gpus.sh "
                                 "(--sampling_steps 20, TREE_SPLIT_POINTS 0,3,6,9, TREE_SPLIT_NOISE_SCALE 4.0, "
                                 "TREE_PROB_WEIGHTED false, --clip_range 1e-3, --adv_clip_max 5.0, DEPTH_PRUNING '', "
                                 "WIDTH_PRUNING_MODE 0); 2 children per split hard-coded in "
                                 "fastvideo/train_branchgrpo_flux.py@ffc3c90:405"},
        "branchgrpo_pruned": {"split_steps": [0, 3, 6, 9], "ks": [2, 2, 2, 2], "split_noise_scale": 4.0,
                              "fusion": "mean", "clip_range": 1e-3, "adv_clip_max": 5.0,
                              "width_pruning_mode": 1, "width_pruning_ratio": 0.5,
                              "depth_pruning": [15, 16, 17, 18], "depth_pruning_slide": True,
                              "depth_pruning_slide_interval": 30, "depth_pruning_stop_depth": 9,
                              "source": "Fredreic1849/BranchGRPO@19fbb9f finetune_flux_branchgrpo_8gpus.sh with the "
                                        "values its comments give (DEPTH_PRUNING '15,16,17,18', DEPTH_PRUNING_SLIDE "
                                        "true, interval 30, stop depth 9, WIDTH_PRUNING_MODE 1) and argparse "
                                        "--width_pruning_ratio 0.5 (train_branchgrpo_flux.py@ffc3c90:2103)"},
    }

    def check_hparams(self, hp):
        if len(hp["split_steps"]) != len(hp["ks"]):
            raise TaskError(f"split_steps {hp['split_steps']} and ks {hp['ks']} need one k per split")
        if hp["sde_window"] is not None and len(hp["sde_window"]) not in (1, 2):
            raise TaskError(f"sde_window must be [start] or [start, end], got {hp['sde_window']}")

    def __init__(self):
        self.step_count = 0  # training steps taken: the sliding depth-pruning window moves with it

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, st: dict) -> None:
        self.step_count = int(st.get("step_count", 0))

    def collect(self, ctx, cond, seeds):
        hp, N = ctx.hp, ctx.process.num_steps
        mask = None if hp["sde_window"] is None else sde_window(N, *hp["sde_window"])
        tree = branching_tree(ctx.behaviour, ctx.shape, cond, list(seeds), hp["split_steps"], hp["ks"],
                              stochastic=mask, dtype=_dtype(ctx), split_noise_scale=hp["split_noise_scale"])
        return to_batch(tree, ctx.reward)

    def prepare(self, batch, ctx):
        tree, leaves, hp = batch.extras["tree"], batch.extras["leaves"], ctx.hp
        values = fuse_rewards(tree.parent, leaves, batch.rewards, tree.edge_log_prob(), hp["fusion"])
        nodes = torch.arange(tree.num_nodes)
        adv = node_advantages(tree, values, nodes, tree.depth, hp["group_strategy"], hp["adv_eps"], None,
                              hp["adv_unbiased"], hp["adv_zero_std"])
        batch.extras["node_values"], batch.extras["node_advantages"] = values, adv  # unclipped (the code's)
        batch.extras["advantages"] = adv.clamp(-hp["adv_clip_max"], hp["adv_clip_max"])
        self.step_count += 1  # the code's training step counts from 1 (main loop :1857)
        keep = self.kept_rows(tree, batch.rows, adv, hp, self.step_count)
        batch.rows = batch.rows.select(keep)

    @staticmethod
    def depth_window(tree, hp, step_count: int) -> set:
        """The child depths (= step + 1) that depth pruning drops at this training step (:1270-1300)."""
        depths = sorted(int(d) for d in hp["depth_pruning"])
        if not depths or not hp["depth_pruning_slide"]:
            return set(depths)
        splits = tree.extras["split_steps"]
        stop = hp["depth_pruning_stop_depth"]
        stop = (max(splits) if splits else 0) if stop is None else int(stop)
        shift = min(step_count // max(1, int(hp["depth_pruning_slide_interval"])), max(0, depths[0] - stop))
        return {d - shift for d in depths}

    @classmethod
    def kept_rows(cls, tree, rows, adv, hp, step_count: int = 1) -> torch.Tensor:
        """(R,) bool: the rows trained after depth pruning, then width pruning (:1268-1477)."""
        if int(hp["width_pruning_mode"]) not in WIDTH_MODES:
            raise ValueError(f"branch_grpo: width_pruning_mode must be one of {WIDTH_MODES}")
        drop = cls.depth_window(tree, hp, step_count)
        keep = ~torch.isin(rows.step + 1, torch.tensor(sorted(drop), dtype=torch.long)) if drop else \
            torch.ones(len(rows), dtype=torch.bool)
        mode, splits = int(hp["width_pruning_mode"]), tree.extras["split_steps"]
        if mode == 0 or not splits:
            return keep
        last = torch.nonzero(keep & (rows.step > max(splits))).flatten()  # edges after the last split
        if last.numel() == 0:
            return keep
        rank = tree.dfs_rank()  # the code's edge order (collect_all_transitions), for ties
        order = sorted(last.tolist(), key=lambda r: (int(rank[rows.sample[r]]), int(rows.step[r])))
        a = adv[rows.sample].tolist()
        ratio = float(hp["width_pruning_ratio"])
        kept = []
        if mode == 1:  # per last-split branch (the leaf whose segment the edge is in), best first
            for node in dict.fromkeys(int(rows.sample[r]) for r in order):
                group = sorted((r for r in order if int(rows.sample[r]) == node), key=lambda r: -a[r])
                kept += group[:max(1, int(len(group) * ratio))]
        else:  # best and worst of all last-layer edges
            srt = sorted(order, key=lambda r: -a[r])
            k = max(2, int(len(srt) * ratio))
            best = k // 2
            kept = srt[:best] + (srt[-(k - best):] if k - best > 0 else [])
        keep[last] = False
        keep[torch.tensor(sorted(set(kept)), dtype=torch.long)] = True
        return keep

    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        A = batch.extras["advantages"][rows.sample]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        log_ratio = p.log_prob(rows.x_next, p.mean(rows.x, out, rows.step), rows.step) - rows.log_prob
        batch.extras["stats"] = trust.ppo_stats(log_ratio, hp["clip_range"])
        return trust.ppo_clip(torch.exp(log_ratio), A, hp["clip_range"]).mean()

    def rsm_spec(self, batch, ctx):
        rows, p = batch.rows, ctx.process
        A = batch.extras["advantages"][rows.sample]
        R = len(rows)
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(p, rows, A, 1.0), gamma=torch.ones(R),
                       c1=weights.kl_natural(p, rows, 1.0), c2=torch.zeros(R), anchor="behaviour")
