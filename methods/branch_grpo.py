"""Branch-GRPO: tree rollouts with shared prefixes, reward fusion and depth-wise advantages.

Paper: Li, Wang et al. 2025, "BranchGRPO: Stable and Efficient GRPO with Structured Branching in
Diffusion Models", arXiv 2509.06040: (1) branching rollouts: the SDE sampler splits at chosen
steps into k children that share their prefix; (2) reward fusion: each internal node's value is
fused from its descendant leaves' rewards (uniform average, or path-probability weighted), and
advantages are standardised per depth; (3) width/depth pruning: only some nodes/depths are
back-propagated (compute only; forward rollouts unchanged). The loss is DanceGRPO's PPO-clip
(arXiv 2505.07818, Eq. 6–8) on every tree edge. Not in the RSM code; digest §8.8.
Table 1 row: "Branch-GRPO" (branching: Yes). Digest §7.2, §8.8.
Equivalence kind: ``grad_at_behaviour``: per edge n → m the first-step gradient is −A_m·∇⟨log p_θ(m|n)⟩
at θ = θ† (ρ = 1, clip inactive); pruning selects rows and is applied to both formulations.

Reading of the paper where its formulas were not available here [I]: ``path_prob`` fusion weights
leaf ℓ under node n by softmax over ℓ of Σ ⟨log p_θ†⟩ along the path n → ℓ; depth-wise
normalisation standardises node values among the nodes of one depth within the grouping
(``prompt``: all trees of a prompt); width pruning keeps, per root, the rows on the paths to the
``width_keep`` highest- and ``width_keep`` lowest-reward leaves; depth pruning drops the rows of
the listed depths.

Rows: every stochastic transition of every node (a shared prefix is ONE row set, not copied per
leaf); a row of node m carries A_m.
Original (per row, mean over rows, ⟨·⟩ per-element means):
    ρ = exp(⟨log p_θ⟩ − ⟨log p_θ†⟩),  L = max(−A_m·ρ, −A_m·clip(ρ, 1 ± ε))
RSM instance (digest §8.5, §8.8): Ψ̂/a = −A_m·ξ/w_t, γ = 1, C1·a² = w_t²/2, C2 = 0, anchor s_θ†.
"""
from __future__ import annotations

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.method import Method, _dtype, register
from rsmbench.core.rsm import RSMSpec
from rsmbench.core.tree import branching_tree, fuse_rewards, node_advantages, sde_window, to_batch


@register
class BranchGRPO(Method):
    id = "branch_grpo"
    processes = ("diffusion", "flow")
    order = "zeroth"
    kind = "grad_at_behaviour"
    table_row = {"psi": '(σ/Ω)·A_node·ξ, A from fused descendant leaves, per-depth normalised', "gamma": '1',
                 "c1": 'Ω²/(2σ²), anchor s_θ†', "c2": 'PPO clip', "branching": True, "current_state": False}
    paper = ("BranchGRPO: Li, Wang et al. 2025, arXiv 2509.06040 (branching, reward fusion, depth-wise "
             "advantages, pruning); DanceGRPO PPO-clip: arXiv 2505.07818, Eq. 6-8; RSM digest §8.8")
    table1 = "Branch-GRPO"
    kind_reason = "θ = θ† (ρ = 1, clip inactive) on every tree edge; pruning is row selection, shared by both"
    defaults = {"split_steps": [1, 4], "ks": [2, 2], "sde_window": None, "fusion": "mean",
                "group_strategy": "prompt", "clip_range": 1e-4, "adv_clip_max": 5.0, "adv_eps": 1e-4,
                "width_keep": None, "prune_depths": []}
    presets = {
        "branchgrpo": {"split_steps": [0, 3, 6, 9], "ks": [2, 2, 2, 2], "fusion": "path_prob",
                       "group_strategy": "prompt", "clip_range": 1e-4, "adv_clip_max": 5.0,
                       "source": "arXiv 2509.06040 §4 (our reading: 20-step sampler, splits at steps 0/3/6/9 with "
                                 "2 children each = 16 leaves per prompt; DanceGRPO clip 1e-4, adv clip 5)"},
        "branchgrpo_pruned": {"split_steps": [0, 3, 6, 9], "ks": [2, 2, 2, 2], "fusion": "path_prob",
                              "width_keep": 2, "prune_depths": [4],
                              "source": "arXiv 2509.06040 §3.4 width + depth pruning (our reading of the "
                                        "kept-leaf count and pruned depth)"},
    }

    def collect(self, ctx, cond, seeds):
        hp, N = ctx.hp, ctx.process.num_steps
        mask = None if hp["sde_window"] is None else sde_window(N, *hp["sde_window"])
        tree = branching_tree(ctx.behaviour, ctx.shape, cond, list(seeds), hp["split_steps"], hp["ks"],
                              stochastic=mask, dtype=_dtype(ctx))
        return to_batch(tree, ctx.reward)

    def prepare(self, batch, ctx):
        tree, leaves, hp = batch.extras["tree"], batch.extras["leaves"], ctx.hp
        values = fuse_rewards(tree.parent, leaves, batch.rewards, tree.node_log_prob(), hp["fusion"])
        nodes = torch.arange(tree.num_nodes)
        batch.extras["node_values"] = values
        batch.extras["advantages"] = node_advantages(tree, values, nodes, tree.depth, hp["group_strategy"],
                                                     hp["adv_eps"], hp["adv_clip_max"])
        keep = self._kept_nodes(tree, leaves, batch.rewards, hp)
        batch.rows = batch.rows.select(keep[batch.rows.sample])

    @staticmethod
    def _kept_nodes(tree, leaves, rewards, hp) -> torch.Tensor:
        """(M,) bool: nodes whose rows are trained after width and depth pruning."""
        keep = torch.ones(tree.num_nodes, dtype=torch.bool)
        if hp["width_keep"] is not None:
            keep[:] = False
            n = int(hp["width_keep"])
            for r in torch.unique(tree.root[leaves]):
                lv, rw = leaves[tree.root[leaves] == r], rewards[tree.root[leaves] == r]
                order = torch.argsort(rw)
                for leaf in torch.cat([lv[order[:n]], lv[order[-n:]]]).tolist():
                    while leaf >= 0:  # the leaf and all its ancestors
                        keep[leaf], leaf = True, int(tree.parent[leaf])
        for d in hp["prune_depths"]:
            keep &= tree.depth != int(d)
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
