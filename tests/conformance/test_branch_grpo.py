"""branch_grpo's original against Fredreic1849/BranchGRPO@ffc3c90 fastvideo/train_branchgrpo_flux.py and its
launch script @19fbb9f. Tolerance 1e-10 relative (tests/conformance/zo_common.py). Width and depth pruning
against hand-worked cases: tests/test_tree.py::test_branch_grpo_pruning_selects_rows."""
import math

import numpy as np
import pytest
import torch

from rsmbench.core import tree as tr
from rsmbench.core.method import get
from tests.conformance.zo_common import (
    REL,
    assert_pinned,
    assert_sensitive,
    flow_grpo_sde,
    flow_sigmas,
    ppo_rows,
    rel,
    toy,
)

HP = {"split_steps": [0, 2, 5], "ks": [2, 2, 2]}
C0 = {"eps": 0.1, "alpha": 1.0, "ddof": 1.0, "clip": 0.02}  # test values (published ones pinned below)


def official_nodes(t):
    """The authors' tree, one node per step (``run_tree_sample_step``:401-512): node (n, d) is the state after
    step d − 1 on this file's node n; each transition (n, i) of the rows leads from its parent node to (n, i + 1)."""
    rows = t.rows()
    parent, lp = {}, {}
    for n, i, p in zip(rows.sample.tolist(), rows.step.tolist(), rows.log_prob.tolist()):
        par = int(t.parent[n])
        parent[(n, i + 1)] = (n, i) if i > int(t.start[n]) else ((par, i) if par >= 0 else (n, 0))
        lp[(n, i + 1)] = p
    return parent, lp


def official_advantages(t, rewards, mode, C):
    """``compute_node_rewards_from_leaves``:545-652 (uniform leaf mean, or bottom-up softmax(α·child
    edge log-prob) over the children's values, one child passing its value up) and
    ``compute_hierarchical_advantages_by_depth``:655-687 (per tree and depth: one node → 0; torch std
    (n − 1) < 1e-6 → 0; else (v − mean)/(std + 1e-8)), per tree as :1149-1180 calls them."""
    parent, lp = official_nodes(t)
    children = {}
    for c, p in parent.items():
        children.setdefault(p, []).append(c)
    leaf_reward = {(int(n), int(t.end[n])): float(r) for n, r in zip(t.leaves, rewards)}
    value = dict(leaf_reward)

    def leaves_below(k):
        return [k] if k not in children else [x for c in children[k] for x in leaves_below(c)]

    for k in sorted(children, key=lambda k: -k[1]):  # deepest first
        ch = children[k]
        if mode == "mean":
            value[k] = float(np.mean([leaf_reward[x] for x in leaves_below(k)]))
        elif len(ch) == 1:
            value[k] = value[ch[0]]
        else:
            w = np.exp(C["alpha"] * np.array([lp[c] for c in ch]))
            value[k] = float((w / w.sum() * np.array([value[c] for c in ch])).sum())
    root_of = lambda k: int(t.root[k[0]])  # noqa: E731
    adv = {}
    for tree_id in set(root_of(k) for k in value):
        for d in set(k[1] for k in value if root_of(k) == tree_id):
            keys = [k for k in value if root_of(k) == tree_id and k[1] == d]
            v = np.array([value[k] for k in keys])
            if len(v) <= 1:
                a = np.zeros(len(v))
            else:
                std = math.sqrt(((v - v.mean()) ** 2).sum() / (len(v) - C["ddof"]))
                a = np.zeros(len(v)) if std < 1e-6 else (v - v.mean()) / (std + C["eps"])
            adv.update(zip(keys, a))
    return adv


def row_advantages(t, rows, adv):
    return torch.tensor([adv[(n, i + 1)] for n, i in zip(rows.sample.tolist(), rows.step.tolist())])


@pytest.fixture(scope="module", params=["mean", "prob_weighted"])
def case(request):
    m, ctx, batch = toy("branch_grpo", "flow", {**HP, "fusion": request.param, "clip_range": C0["clip"],
                                                 "adv_eps": C0["eps"]}, shift=0.05)
    with torch.no_grad():
        return request.param, ctx, batch, m.original_loss(batch, ctx).item()


def test_fusion_and_depthwise_advantages_conform(case):
    mode, ctx, batch, _ = case
    t, rows = batch.extras["tree"], batch.rows
    ours = batch.extras["node_advantages"][rows.sample]
    assert rel(ours, row_advantages(t, rows, official_advantages(t, batch.rewards, mode, C0))) <= REL


@pytest.mark.parametrize("key", ["eps", "alpha", "ddof"])
def test_advantages_detect_a_changed_constant(case, key):
    mode, ctx, batch, _ = case
    if mode == "mean" and key == "alpha":
        pytest.skip("the uniform fusion has no temperature")
    t, rows = batch.extras["tree"], batch.rows
    ours = batch.extras["node_advantages"][rows.sample]
    assert_sensitive(ours, lambda C: row_advantages(t, rows, official_advantages(t, batch.rewards, mode, C)), C0, [key])


def edge_loss(ctx, batch, C):
    """``train_one_step_tree``:1504-1575: per edge ρ = exp(new_log_prob − old_log_prob), A clamped to
    ±adv_clip_max, max(−A·ρ, −A·clamp(ρ, 1 ± clip_range)); here a mean over the edges (the loop's cadence)."""
    t, rows = batch.extras["tree"], batch.rows
    A = torch.clamp(row_advantages(t, rows, official_advantages(t, batch.rewards, ctx.hp["fusion"], C)), -5.0, 5.0)
    sig = flow_sigmas(ctx.process.num_steps)
    _, _, lp = flow_grpo_sde(sig, rows.step, rows.x, ctx.policy(rows.x, rows.step, rows.cond), rows.x_next, 0.7)
    return ppo_rows(A, torch.exp(lp - rows.log_prob), C["clip"]).mean()


def test_edge_loss_conforms(case):
    _, ctx, batch, ours = case
    assert 0 < batch.extras["stats"]["clipfrac"] < 1
    with torch.no_grad():
        assert rel(ours, edge_loss(ctx, batch, C0)) <= REL
        assert_sensitive(ours, lambda C: edge_loss(ctx, batch, C), C0, ["clip"])


def test_split_noise_is_scaled_and_log_prob_keeps_sigma():
    """``flux_step_with_split``:269-281: each split child draws prev_sample_mean + randn·split_noise_scale·
    std_dev_t, and its log-prob uses std_dev_t (unscaled): the stored ξ is s·randn = (x' − μ)/σ."""
    m, ctx, _ = toy("branch_grpo", "flow", HP, shift=0.0)
    cond, seeds = torch.arange(2).repeat_interleave(4), list(range(8))
    trees = {s: tr.branching_tree(ctx.behaviour, ctx.shape, cond, seeds, HP["split_steps"], HP["ks"],
                                  dtype=torch.float64, split_noise_scale=s) for s in (1.0, 4.0)}
    rows = {s: t.rows() for s, t in trees.items()}
    split = (rows[4.0].step == trees[4.0].start[rows[4.0].sample]) & (trees[4.0].parent[rows[4.0].sample] >= 0)
    assert int(split.sum()) == 8 * (2 + 4 + 8)
    sig = flow_sigmas(8)
    r4 = rows[4.0].select(split)
    _, std, lp = flow_grpo_sde(sig, r4.step, r4.x, r4.out_behaviour, r4.x_next, 0.7)
    assert rel(r4.log_prob, lp) <= REL  # log N(x'; μ, σ²), σ = std_dev_t·√Δt unscaled
    assert rel(r4.x_next - r4.mean, (std * torch.sqrt(sig[r4.step] - sig[r4.step + 1])[:, None]) * r4.noise) <= REL

    def scaled(C):
        return C["s"] * rows[1.0].select(split).noise

    assert rel(r4.noise, scaled({"s": 4.0})) <= REL
    assert_sensitive(r4.noise, scaled, {"s": 4.0})
    assert torch.equal(rows[4.0].select(~split).noise, rows[1.0].select(~split).noise)  # other edges: unscaled ξ


def test_presets_are_the_released_script():
    """finetune_flux_branchgrpo_8gpus.sh@19fbb9f: TREE_SPLIT_POINTS 0,3,6,9, TREE_SPLIT_NOISE_SCALE 4.0,
    TREE_PROB_WEIGHTED false, --clip_range 1e-3, --adv_clip_max 5.0, --sampling_steps 20, WIDTH_PRUNING_MODE 0,
    DEPTH_PRUNING ''; train_branchgrpo_flux.py@ffc3c90:405 (2 children per split), :680 (+1e-8), :675 (1e-6),
    :2103 (--width_pruning_ratio 0.5)."""
    m = get("branch_grpo")
    assert_pinned(m.hparams("branchgrpo"), {"split_steps": [0, 3, 6, 9], "ks": [2, 2, 2, 2], "split_noise_scale": 4.0,
                                            "fusion": "mean", "clip_range": 1e-3, "adv_clip_max": 5.0, "adv_eps": 1e-8,
                                            "adv_zero_std": 1e-6, "adv_unbiased": True, "group_strategy": "seed",
                                            "width_pruning_mode": 0, "depth_pruning": [], "width_pruning_ratio": 0.5})
