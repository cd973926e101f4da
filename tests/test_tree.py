"""rsmbench.core.tree: tree shapes, shared prefixes, NFE accounting (derivations §9.5), determinism,
reward fusion and per-depth advantage normalisation against hand-computed values."""
from types import SimpleNamespace

import pytest
import torch

from rsmbench.core import tree
from rsmbench.core.method import get
from tests.helpers import tiny_policy

COND = torch.tensor([0, 1, 1])
SEEDS = [5, 6, 7]


def _count_calls(policy):
    """Count the per-sample network evaluations actually made (a forward pre-hook on the net)."""
    box = {"n": 0}
    policy.net.register_forward_pre_hook(lambda mod, args: box.__setitem__("n", box["n"] + args[0].shape[0]))
    return box


def test_nfe_formula_matches_the_derivations_numbers():
    assert tree.nfe_localised([6, 6, 8, 10, 0, 0, 0, 0, 0, 0], 10) == 258  # SD3.5 lowsnr2, 30 leaves
    assert tree.nfe_localised([6] * 9, 10) == 334  # TempFlow-like base profile, 54 leaves
    assert tree.nfe_localised([6] * 9, 10, cfg=True) == 668
    assert tree.nfe_localised([2, 0, 3], 6) == 6 + 5 + (2 * 5 + 3 * 3)  # hand count: 30
    assert tree.nfe_branching([1, 3], [2, 3], 6) == 1 * 1 + 2 * 2 + 6 * 3  # 23
    assert tree.nfe_branching([], [], 6) == 6


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_localised_tree_shape_prefixes_and_counted_nfe(kind):
    _, beh = tiny_policy(kind, cfg_scale=1.5, num_steps=6)
    calls = _count_calls(beh)
    k = [2, 0, 3]
    t = tree.localised_tree(beh, (2,), COND, SEEDS, k, dtype=torch.float64)
    leaves = t.leaves
    assert leaves.numel() == len(SEEDS) * sum(k) and len(t.rows()) == leaves.numel()
    # counted network evaluations = §9.5 formula (×2: the CFG branches run in one batch)
    assert t.nfe == len(SEEDS) * tree.nfe_localised(k, 6) and calls["n"] == 2 * t.nfe
    root = t.segments[0]
    assert not root.stochastic.any() and torch.equal(root.noises, torch.zeros_like(root.noises))
    for leaf in leaves.tolist():
        i, r = int(t.start[leaf]), int(t.root[leaf])
        path = t.path_states(leaf)
        assert path.shape == (7, 2) and torch.equal(t.final(torch.tensor([leaf]))[0], path[-1])
        assert torch.equal(path[: i + 1], root.states[r, : i + 1])  # shared prefix, bit-identical
        assert not torch.equal(path[i + 1], root.states[r, i + 1])  # the one SDE step differs
        seg = t.segments[[int(ids[0]) <= leaf <= int(ids[-1]) for ids in t.seg_nodes].index(True)]
        assert seg.stochastic.tolist() == [True] + [False] * (5 - i)  # stochasticity localised at i


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_branching_tree_leaves_prefixes_and_counted_nfe(kind):
    _, beh = tiny_policy(kind, cfg_scale=1.5, num_steps=6)
    calls = _count_calls(beh)
    t = tree.branching_tree(beh, (2,), COND, SEEDS, [1, 3], [2, 3], dtype=torch.float64)
    leaves = t.leaves
    assert leaves.numel() == len(SEEDS) * 2 * 3 and (t.depth[leaves] == 2).all()
    assert t.nfe == len(SEEDS) * tree.nfe_branching([1, 3], [2, 3], 6) and calls["n"] == 2 * t.nfe
    # every stochastic transition once: shared prefix rows are not copied per leaf
    assert len(t.rows()) == t.nfe
    for a in leaves.tolist():
        for b in leaves.tolist():
            if a >= b or t.root[a] != t.root[b]:
                continue
            pa, pb = t.path_states(a), t.path_states(b)
            same_parent = t.parent[a] == t.parent[b]
            split = 3 if same_parent else 1  # siblings share up to x_3, cousins up to x_1
            assert torch.equal(pa[: split + 1], pb[: split + 1])
            assert not torch.equal(pa[split + 1], pb[split + 1])


def test_trees_are_deterministic_given_seeds():
    _, beh = tiny_policy("flow", cfg_scale=1.5, num_steps=5)
    for build in (lambda s: tree.localised_tree(beh, (2,), COND, s, [2, 1], dtype=torch.float64),
                  lambda s: tree.branching_tree(beh, (2,), COND, s, [0, 2], [2, 2], dtype=torch.float64)):
        a, b, c = build(SEEDS), build(SEEDS), build([5, 6, 99])
        for ra, rb, rc, ids in zip(a.segments, b.segments, c.segments, a.seg_nodes):
            assert torch.equal(ra.states, rb.states) and torch.equal(ra.noises, rb.noises)
            first_two = a.root[ids] < 2  # changing the third seed leaves the other trees untouched
            assert torch.equal(ra.states[first_two], rc.states[first_two])
            assert not torch.equal(ra.states[~first_two], rc.states[~first_two])


def test_branch_schedule_and_window():
    assert tree.branch_schedule([6, 6, 8, 10, 0, 0, 0, 0, 0, 3], 10)[-1] == 0  # last entry ignored
    assert tree.branch_schedule([1], 3) == [1, 0, 0]
    with pytest.raises(ValueError):
        tree.branch_schedule([1, 1, 1, 1], 3)
    assert tree.sde_window(5, 1, 3).tolist() == [False, True, True, False, False]


def test_fusion_by_hand():
    """BranchGRPO compute_node_rewards_from_leaves@ffc3c90:615-649: uniform leaf mean, or bottom-up the
    softmax of the children's edge log-probs (α = 1) over the children's values; one child: its value."""
    # node 0 → {1, 2}; node 1 → leaves {3, 4}; node 2 → leaf 5
    parent = torch.tensor([-1, 0, 0, 1, 1, 2])
    leaves, r = torch.tensor([3, 4, 5]), torch.tensor([1.0, 3.0, 8.0], dtype=torch.float64)
    mean = tree.fuse_rewards(parent, leaves, r, mode="mean")
    torch.testing.assert_close(mean, torch.tensor([4.0, 2.0, 8.0, 1.0, 3.0, 8.0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    lp = torch.log(torch.tensor([1.0, 1.0, 3.0, 1.0, 3.0, 5.0], dtype=torch.float64))  # edge log-probs
    pw = tree.fuse_rewards(parent, leaves, r, lp, mode="prob_weighted")
    # node 1: weights 1:3 → 0.25·1 + 0.75·3 = 2.5; node 2: its one child, 8; node 0: 1:3 → 0.25·2.5 + 0.75·8
    torch.testing.assert_close(pw, torch.tensor([6.625, 2.5, 8.0, 1.0, 3.0, 8.0], dtype=torch.float64),
                               rtol=0, atol=1e-14)
    with pytest.raises(ValueError):
        tree.fuse_rewards(parent, leaves, r, mode="path_prob")


def test_branch_grpo_depthwise_advantages_by_hand():
    """Per tree and depth (seed), or pooled over a prompt's trees (prompt): (v − mean)/(std + 1e-8),
    torch's unbiased std, 0 for a one-node depth (BranchGRPO@ffc3c90:655-687)."""
    _, beh = tiny_policy("diffusion", num_steps=3)
    t = tree.branching_tree(beh, (2,), torch.tensor([0, 0]), [1, 2], [1], [2], dtype=torch.float64)
    rewards = torch.tensor([1.0, 3.0, 5.0, 9.0], dtype=torch.float64)  # leaves = nodes 2, 3 (root 0), 4, 5 (root 1)
    batch = tree.to_batch(t, lambda x, c: rewards)
    m = get("branch_grpo")
    f64 = dict(dtype=torch.float64)
    for strategy in ("prompt", "seed"):
        b = tree.to_batch(t, lambda x, c: rewards)
        m.prepare(b, SimpleNamespace(hp=m.hparams(group_strategy=strategy, fusion="mean")))
        torch.testing.assert_close(b.extras["node_values"], torch.tensor([2.0, 7.0, 1, 3, 5, 9], **f64))
        A = b.extras["advantages"]
        if strategy == "prompt":  # depth 0: (2, 7) unbiased std 2.5·√2; depth 1: mean 4.5, std √(35/3)
            exp0 = torch.tensor([-2.5, 2.5], **f64) / (2.5 * 2**0.5 + 1e-8)
            exp1 = (rewards - 4.5) / ((35 / 3) ** 0.5 + 1e-8)
        else:  # seed: depth 0 has one node per tree (A = 0); depth 1: the sibling pairs, std √2 and 2√2
            exp0 = torch.zeros(2, **f64)
            exp1 = torch.tensor([-1.0, 1.0, -2.0, 2.0], **f64) / (torch.tensor([1, 1, 2, 2.0], **f64) * 2**0.5 + 1e-8)
        torch.testing.assert_close(A, torch.cat([exp0, exp1]), rtol=0, atol=1e-12)
        torch.testing.assert_close(A[b.rows.sample], A[t.rows().sample])  # each row carries its node's A
    assert batch.extras["reward_queries"] == 4 and batch.extras["nfe"] == t.nfe == 2 * (1 + 2 * 2)


def test_branch_grpo_pruning_selects_rows():
    """Depth pruning drops edges by child depth = step + 1; width pruning acts on the edges after the
    last split only: mode 1 keeps max(1, ⌊n·ratio⌋) per last-split branch (ties: step order), mode 2 the
    best ⌊k/2⌋ and worst k − ⌊k/2⌋ of all, k = max(2, ⌊n·ratio⌋) (BranchGRPO@ffc3c90:1268-1477)."""
    _, beh = tiny_policy("flow", num_steps=6)
    t = tree.branching_tree(beh, (2,), torch.tensor([0]), [3], [1, 2], [2, 2], dtype=torch.float64)
    rewards = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)  # leaves 3..6, segments [2, 6)
    m = get("branch_grpo")

    def kept(**hp):
        b = tree.to_batch(t, lambda x, c: rewards)
        m.prepare(b, SimpleNamespace(hp=m.hparams(**hp)))
        return sorted(zip(b.rows.sample.tolist(), b.rows.step.tolist()))

    every = sorted(zip(t.rows().sample.tolist(), t.rows().step.tolist()))
    assert kept() == every and len(every) == 1 + 2 * 1 + 4 * 4
    assert kept(depth_pruning=[1, 4]) == [(n, s) for n, s in every if s not in (0, 3)]
    after = [(n, s) for n, s in every if s > 2]  # 4 leaves × steps 3, 4, 5
    mode1 = kept(width_pruning_mode=1)
    assert [e for e in mode1 if e[1] > 2] == [(n, 3) for n in (3, 4, 5, 6)]  # one per branch, the first step
    assert [e for e in mode1 if e[1] <= 2] == [e for e in every if e[1] <= 2]  # earlier edges all kept
    mode2 = kept(width_pruning_mode=2)
    assert [e for e in mode2 if e[1] > 2] == [e for e in after if e[0] in (3, 4)]  # best (leaf 3), worst (leaf 4)
