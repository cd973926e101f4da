"""Branching trees and stochasticity localisation for the zeroth-order samplers (derivations §4.2, §9.3–9.5).

Two tree shapes, both built by restarting ``rollout.sample`` from stored states:

- **Localised branches** (TempFlow-GRPO, arXiv 2508.04324; RSM "Ours", derivations §9.3–9.4): one
  deterministic ODE root per seed; at each transition i with k_i > 0, k_i children restart from
  the root state x_i, take ONE stochastic step (the only True entry of their ``stochastic`` mask)
  and continue with the ODE to the end. Each child is a leaf; its single SDE transition is its
  training row. Per root (§9.5):  NFE = N + Σ_i k_i + Σ_i k_i·(N − i − 1)  (×2 with CFG).
- **Branching trees** (Branch-GRPO, arXiv 2509.06040 §3.2): every node runs the (SDE-window)
  sampler over its segment; at split step s_j every frontier node spawns k_j children that share
  its prefix and draw their own noise from step s_j on. Leaves = Π_j k_j per root, and
  NFE per root = Σ_j (Π_{l≤j} k_l)·(s_{j+1} − s_j)  with s_0 = 0, k_0 = 1, s_{m+1} = N.
  A child's first step (its split edge) is always stochastic, and its noise can be scaled:
  x' = μ + σ·(s·ξ) while its log-prob keeps the step's σ (BranchGRPO ``flux_step_with_split``,
  ``tree_split_noise_scale``); the stored ``noise`` is then s·ξ = (x' − μ)/σ.

Randomness: the root's initial noise and its own SDE noise come from the root seed's generator
(``rollout.generators``); every child has its own generator, seeded from (root seed, split
index, parent index, child index) through numpy's SeedSequence. A tree is therefore a
deterministic function of its seeds, and a node's noise does not depend on the batch.

All rows are ``rollout.Transitions``; ``rows.sample`` is the id of the tree node the row belongs
to (for localised branches: the leaf), so advantages are looked up per node.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from rsmbench.core.advantages import group_advantages
from rsmbench.core.method import Batch
from rsmbench.core.rollout import Rollout, Transitions, generators, per_sample_randn, sample

GROUP_STRATEGIES = ("prompt", "seed", "batch")


# ---- randomness and schedules -------------------------------------------------------------------
def child_generator(*key: int) -> torch.Generator:
    """One generator per child, from a SeedSequence over an integer key (root seed, split, …)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def branch_schedule(k, num_steps: int) -> list[int]:
    """Per-transition branch counts k_i, padded with zeros to N entries. Entries past N are an
    error; the final transition (i = N − 1) never branches (its entry is ignored, as in the RSM
    code's 10-entry lists for N = 10, derivations §9.4)."""
    k = [int(v) for v in k]
    if len(k) > num_steps or any(v < 0 for v in k):
        raise ValueError(f"branch schedule {k} must have at most {num_steps} non-negative entries")
    k = k + [0] * (num_steps - len(k))
    k[-1] = 0
    return k


def sde_window(num_steps: int, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Stochasticity localisation as a mask: steps in [start, end) are SDE, the rest ODE."""
    m = torch.zeros(num_steps, dtype=torch.bool)
    m[start:num_steps if end is None else end] = True
    return m


def nfe_localised(k, num_steps: int, cfg: bool = False) -> int:
    """Digest §9.5, per root: N (ODE root) + Σ k_i (SDE branch steps) + Σ k_i·(N − i − 1)."""
    k = branch_schedule(k, num_steps)
    n = num_steps + sum(k) + sum(ki * (num_steps - i - 1) for i, ki in enumerate(k))
    return 2 * n if cfg else n


def nfe_branching(split_steps, ks, num_steps: int, cfg: bool = False) -> int:
    """Per root: Σ_j (Π_{l≤j} k_l)·(s_{j+1} − s_j), s_0 = 0, s_{m+1} = N (every node its segment)."""
    bounds = [0, *split_steps, num_steps]
    width, n = 1, 0
    for j in range(len(bounds) - 1):
        width *= 1 if j == 0 else int(ks[j - 1])
        n += width * (bounds[j + 1] - bounds[j])
    return 2 * n if cfg else n


# ---- the tree ---------------------------------------------------------------------------------------
@dataclass
class Tree:
    """A forest: nodes (one sampled segment each), with their parents and the leaves.

    Node n covers steps [start_n, end_n) from its parent's state at start_n (roots: from their
    initial noise). ``segments[j]`` is one batched ``Rollout`` holding nodes ``seg_nodes[j]``.
    """

    segments: list  # list[Rollout]
    seg_nodes: list  # list[(n_j,) long]
    parent: torch.Tensor  # (M,) long, −1 for roots
    root: torch.Tensor  # (M,) root index (position in the seed list)
    depth: torch.Tensor  # (M,) long
    start: torch.Tensor  # (M,) long
    end: torch.Tensor  # (M,) long
    cond: torch.Tensor | None  # (M,) prompt id per node
    nfe: int  # network evaluations, counted per sample and without the CFG doubling
    cfg: bool  # whether each evaluation ran two CFG branches
    extras: dict = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return self.parent.numel()

    @property
    def leaves(self) -> torch.Tensor:
        """Nodes without children, in node order."""
        has_child = torch.zeros(self.num_nodes, dtype=torch.bool)
        has_child[self.parent[self.parent >= 0]] = True
        return torch.nonzero(~has_child).flatten()

    def _where(self, node: int):
        for ro, ids in zip(self.segments, self.seg_nodes):
            hit = torch.nonzero(ids == node).flatten()
            if hit.numel():
                return ro, int(hit[0])
        raise KeyError(node)

    def node_states(self, node: int) -> torch.Tensor:
        """States of `node` at steps start..end (end − start + 1 of them)."""
        ro, b = self._where(node)
        return ro.states[b]

    def path_states(self, node: int) -> torch.Tensor:
        """The full trajectory x_0..x_end that leads to `node`'s end (shared prefix + own segment)."""
        own = self.node_states(node)
        p = int(self.parent[node])
        if p < 0:
            return own
        return torch.cat([self.path_states(p)[: int(self.start[node])], own])  # own[0] = parent's x_start

    def final(self, nodes=None) -> torch.Tensor:
        """Last states x_{end_n} of the given nodes (default: the leaves, whose end is x_N)."""
        nodes = self.leaves if nodes is None else torch.as_tensor(nodes)
        last = torch.cat([ro.states[:, -1] for ro in self.segments])  # node ids are allocated in segment order
        return last[nodes]

    def node_log_prob(self) -> torch.Tensor:
        """(M,) Σ of behaviour ⟨log p⟩ over each node's stochastic transitions (0 if none)."""
        out = torch.zeros(self.num_nodes, dtype=torch.float64)
        for ro, ids in zip(self.segments, self.seg_nodes):
            if ro.stochastic.any():
                out[ids] = ro.log_probs[:, ro.stochastic].to(torch.float64).sum(dim=1)
        return out

    def edge_log_prob(self) -> torch.Tensor:
        """(M,) behaviour ⟨log p⟩ of each node's first transition, the edge from its parent (its split
        edge; 0 for a root or a node without a stochastic first step)."""
        out = torch.zeros(self.num_nodes, dtype=torch.float64)
        for ro, ids in zip(self.segments, self.seg_nodes):
            if ro.stochastic.numel() and bool(ro.stochastic[0]):
                out[ids] = ro.log_probs[:, 0].to(torch.float64)
        out[self.parent < 0] = 0.0
        return out

    def dfs_rank(self) -> torch.Tensor:
        """(M,) position of each node in a depth-first pre-order walk, roots in order, children in
        creation order (the order BranchGRPO's ``collect_all_transitions`` lists its transitions)."""
        children = {n: [] for n in range(self.num_nodes)}
        for n, par in enumerate(self.parent.tolist()):
            if par >= 0:
                children[par].append(n)
        rank, order = torch.empty(self.num_nodes, dtype=torch.long), []
        stack = [int(r) for r in reversed(torch.nonzero(self.parent < 0).flatten().tolist())]
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(reversed(children[n]))
        rank[torch.tensor(order)] = torch.arange(len(order))
        return rank

    def rows(self) -> Transitions:
        """Every stochastic transition of every node, with ``sample`` = node id."""
        parts = []
        for ro, ids in zip(self.segments, self.seg_nodes):
            if not ro.stochastic.any():
                continue
            tr = ro.transitions(only_stochastic=True)
            tr.sample = ids[tr.sample]
            parts.append(tr)
        return cat_rows(parts)


def cat_rows(parts) -> Transitions:
    """Concatenate ``Transitions`` (all with or all without ``cond``)."""
    parts = [p for p in parts if len(p)] or list(parts[:1])
    return Transitions(**{f.name: (None if getattr(parts[0], f.name) is None
                                   else torch.cat([getattr(p, f.name) for p in parts]))
                          for f in fields(Transitions)})


def _empty_rollout(x: torch.Tensor, step: int, cond) -> Rollout:
    B = x.shape[0]
    z = x.new_zeros((B, 0, *x.shape[1:]))
    return Rollout(states=x[:, None], noises=z, means=z, outputs=z, log_probs=x.new_zeros((B, 0)),
                   steps=torch.arange(step, step), stochastic=torch.zeros(0, dtype=torch.bool), cond=cond)


def _segment(policy, shape, gens, cond, stochastic, x_start, a, b, dtype) -> Rollout:
    if b <= a:
        x = per_sample_randn(gens, shape, dtype) if x_start is None else x_start.to(dtype)
        return _empty_rollout(x, a, cond)
    return sample(policy, shape, gens, cond=cond, stochastic=stochastic, x_start=x_start,
                  start_step=a, end_step=b, dtype=dtype)


def _cat_time(a: Rollout, b: Rollout) -> Rollout:
    """Rollout a followed by b (b starts at a's last state)."""
    c = lambda u, v: torch.cat([u, v], dim=1)  # noqa: E731
    return Rollout(states=c(a.states, b.states[:, 1:]), noises=c(a.noises, b.noises), means=c(a.means, b.means),
                   outputs=c(a.outputs, b.outputs), log_probs=c(a.log_probs, b.log_probs),
                   steps=torch.cat([a.steps, b.steps]), stochastic=torch.cat([a.stochastic, b.stochastic]),
                   cond=a.cond)


@torch.no_grad()
def _split_step(policy, shape, gens, cond, x, step: int, noise_scale: float, dtype) -> Rollout:
    """The split edge: one stochastic step with its noise scaled, x' = μ + σ·(s·ξ), and the log-prob
    of x' under the step's own N(μ, σ²) (BranchGRPO ``flux_step_with_split``@ffc3c90:265-281:
    ``noise * split_noise_scale``, log-prob with the unscaled ``std_dev_t``). ``noise`` stores s·ξ."""
    p = policy.process
    x = x.to(dtype)
    out = policy(x, step, cond)
    xi = per_sample_randn(gens, shape, dtype) * noise_scale
    x1, mu = p.step(x, out, step, xi)
    lp = p.log_prob(x1, mu, step)
    one = lambda z: z[:, None]  # noqa: E731
    return Rollout(states=torch.stack([x, x1], dim=1), noises=one(xi), means=one(mu), outputs=one(out),
                   log_probs=one(lp), steps=torch.tensor([step]), stochastic=torch.ones(1, dtype=torch.bool),
                   cond=cond)


def _uses_cfg(policy, cond) -> bool:
    return cond is not None and policy.cfg_scale != 1.0


def ode_root(policy, shape, cond, seeds, dtype=torch.float32) -> Rollout:
    """The deterministic root (DDIM η = 0 / Euler ODE) from each seed's initial noise: the same
    sampler loop with an all-False ``stochastic`` mask."""
    N = policy.process.num_steps
    return sample(policy, shape, generators(seeds), cond=cond, stochastic=torch.zeros(N, dtype=torch.bool),
                  dtype=dtype)


def localised_tree(policy, shape, cond, seeds, k, dtype=torch.float32) -> Tree:
    """Deterministic ODE root per seed, k_i one-step-SDE branches at each transition i, each
    continued by the ODE (derivations §4.2 "stochasticity localization", §9.3–9.4)."""
    N = policy.process.num_steps
    k = branch_schedule(k, N)
    B = len(seeds)
    root = ode_root(policy, shape, cond, seeds, dtype)
    segs, seg_nodes = [root], [torch.arange(B)]
    parent, rootix, depth, start = [torch.full((B,), -1)], [torch.arange(B)], [torch.zeros(B, dtype=torch.long)], \
        [torch.zeros(B, dtype=torch.long)]
    nfe, nxt = N * B, B
    for i, ki in enumerate(k):
        if ki == 0:
            continue
        rb = torch.arange(B).repeat_interleave(ki)
        gens = [child_generator(seeds[r], i, c) for r in range(B) for c in range(ki)]
        mask = torch.zeros(N, dtype=torch.bool)
        mask[i] = True
        ccond = None if cond is None else cond[rb]
        ro = _segment(policy, shape, gens, ccond, mask, root.states[rb, i], i, N, dtype)
        n = B * ki
        segs.append(ro), seg_nodes.append(torch.arange(nxt, nxt + n))
        parent.append(rb), rootix.append(rb), depth.append(torch.ones(n, dtype=torch.long))
        start.append(torch.full((n,), i))
        nfe += n * (N - i)
        nxt += n
    cat = lambda z: torch.cat(z).long()  # noqa: E731
    rootix_t = cat(rootix)
    return Tree(segments=segs, seg_nodes=seg_nodes, parent=cat(parent), root=rootix_t, depth=cat(depth),
                start=cat(start), end=torch.full((nxt,), N), cond=None if cond is None else cond[rootix_t],
                nfe=nfe, cfg=_uses_cfg(policy, cond), extras={"k": k})


def branching_tree(policy, shape, cond, seeds, split_steps, ks, stochastic=None, dtype=torch.float32,
                   split_noise_scale: float = 1.0) -> Tree:
    """Branch-GRPO tree: the root runs [0, s_1); at each split s_j every frontier node spawns k_j
    children that continue over [s_j, s_{j+1}) with their own noise (arXiv 2509.06040 §3.2).
    ``stochastic`` (default: all SDE) localises the noise to a window (``sde_window``); a split step
    is always stochastic (BranchGRPO ``run_tree_sample_step``@ffc3c90:453-456), and its noise is
    scaled by ``split_noise_scale`` (``_split_step``)."""
    N = policy.process.num_steps
    split_steps, ks = [int(s) for s in split_steps], [int(v) for v in ks]
    if len(split_steps) != len(ks) or any(b <= a for a, b in zip(split_steps, split_steps[1:])) \
            or (split_steps and not 0 <= split_steps[0] < N) or (split_steps and split_steps[-1] >= N) \
            or any(v < 1 for v in ks):
        raise ValueError(f"split steps {split_steps} must increase within [0, {N}) with one k >= 1 each, got k={ks}")
    stochastic = torch.ones(N, dtype=torch.bool) if stochastic is None else \
        torch.as_tensor(stochastic, dtype=torch.bool)
    B = len(seeds)
    bounds = [0, *split_steps, N]
    ro = _segment(policy, shape, generators(seeds), cond, stochastic, None, 0, bounds[1], dtype)
    front = torch.arange(B)
    segs, seg_nodes = [ro], [front]
    parent, rootix, depth, start = [torch.full((B,), -1)], [front], [torch.zeros(B, dtype=torch.long)], \
        [torch.zeros(B, dtype=torch.long)]
    nfe, nxt, front_root, front_local = B * bounds[1], B, front, torch.zeros(B, dtype=torch.long)
    for j, (s, kj) in enumerate(zip(split_steps, ks)):
        e = bounds[j + 2]
        rep = lambda z: z.repeat_interleave(kj)  # noqa: E731
        par, r, loc = rep(front), rep(front_root), rep(front_local) * kj + torch.arange(kj).repeat(len(front))
        gens = [child_generator(seeds[int(ri)], j, int(li)) for ri, li in zip(r, loc)]
        x0 = ro.states[:, -1].repeat_interleave(kj, dim=0)
        ccond = None if cond is None else cond[r]
        ro = _split_step(policy, shape, gens, ccond, x0, s, split_noise_scale, dtype)
        if e > s + 1:
            ro = _cat_time(ro, _segment(policy, shape, gens, ccond, stochastic, ro.states[:, -1], s + 1, e, dtype))
        n = len(par)
        ids = torch.arange(nxt, nxt + n)
        segs.append(ro), seg_nodes.append(ids)
        parent.append(par), rootix.append(r), depth.append(torch.full((n,), j + 1)), start.append(torch.full((n,), s))
        nfe += n * (e - s)
        nxt, front, front_root, front_local = nxt + n, ids, r, loc
    cat = lambda z: torch.cat(z).long()  # noqa: E731
    rootix_t = cat(rootix)
    end = torch.tensor([bounds[int(d) + 1] for d in cat(depth)])
    return Tree(segments=segs, seg_nodes=seg_nodes, parent=cat(parent), root=rootix_t, depth=cat(depth),
                start=cat(start), end=end, cond=None if cond is None else cond[rootix_t], nfe=nfe,
                cfg=_uses_cfg(policy, cond), extras={"split_steps": split_steps, "ks": ks,
                                                     "split_noise_scale": float(split_noise_scale)})


# ---- rewards up the tree, groups, KL-anchor rows ------------------------------------------------
FUSIONS = ("mean", "prob_weighted")


def fuse_rewards(parent: torch.Tensor, leaves: torch.Tensor, leaf_rewards: torch.Tensor,
                 edge_log_prob: torch.Tensor | None = None, mode: str = "mean", alpha: float = 1.0) -> torch.Tensor:
    """Value of every node from its descendant leaves (Branch-GRPO reward fusion, arXiv 2509.06040 §3.3;
    BranchGRPO ``compute_node_rewards_from_leaves``@ffc3c90:545-652). A leaf's value is its reward.
    ``mean``: the uniform average of the node's descendant leaves (:643-649; the released script's
    setting, ``TREE_PROB_WEIGHTED="false"``). ``prob_weighted`` (``--tree_prob_weighted``, :615-641):
    bottom-up, a node with one child takes the child's value, a node with several children the
    softmax(α·⟨log p⟩ of each child's edge)-weighted sum of the children's values, α = 1
    (``edge_log_prob``: ``Tree.edge_log_prob``)."""
    if mode not in FUSIONS:
        raise ValueError(f"fusion mode must be one of {FUSIONS}, got {mode!r}")
    M = parent.numel()
    values = torch.zeros(M, dtype=torch.float64)
    r = leaf_rewards.to(torch.float64)
    values[leaves] = r
    children = {n: [] for n in range(M)}
    for n, par in enumerate(parent.tolist()):
        if par >= 0:
            children[par].append(n)
    depth = torch.zeros(M, dtype=torch.long)
    for n in range(M):  # parents are allocated before their children
        depth[n] = 0 if parent[n] < 0 else depth[parent[n]] + 1
    below = {n: [] for n in range(M)}  # descendant leaves
    for leaf, rv in zip(leaves.tolist(), r.tolist()):
        n = leaf
        while n >= 0:
            below[n].append(rv)
            n = int(parent[n])
    lp = torch.zeros(M, dtype=torch.float64) if edge_log_prob is None else edge_log_prob.to(torch.float64)
    for n in sorted(range(M), key=lambda k: -int(depth[k])):
        ch = children[n]
        if not ch:
            continue
        if mode == "mean":
            values[n] = torch.tensor(below[n], dtype=torch.float64).mean()
        elif len(ch) == 1:
            values[n] = values[ch[0]]
        else:
            w = torch.softmax(alpha * lp[ch], 0)
            values[n] = (w * values[ch]).sum()
    return values.to(leaf_rewards.dtype)


def group_ids(strategy: str, level: torch.Tensor, root: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Group id per node for advantage normalisation (RSM code ``group_strategy``, derivations §9.3–9.4):
    ``prompt`` → (prompt, level), ``seed`` → (root, level) i.e. siblings, ``batch`` → (level).
    `level` is the branch step (localised trees) or the depth (branching trees)."""
    if strategy not in GROUP_STRATEGIES:
        raise ValueError(f"group strategy must be one of {GROUP_STRATEGIES}, got {strategy!r}")
    first = {"prompt": cond if cond is not None else torch.zeros_like(root), "seed": root,
             "batch": torch.zeros_like(root)}[strategy]
    return torch.unique(torch.stack([first.long(), level.long()], dim=1), dim=0, return_inverse=True)[1]


def kl_anchor_rows(tree: Tree, max_rows: int | None = None, seed: int = 0) -> Transitions | None:
    """ODE-KL-anchor rows (RSM code ``use_ode_kl_anchor``, derivations §6, §9.3): the deterministic root
    states at every transition that carries no branch (k_i = 0) and is not the final one (the RSM code
    collects them in ``sd3_pipeline_with_logprob_perstep.py``@e8be3df:568-596 and keeps those in the
    training window). ``max_rows`` None keeps all of them (SD3.5, ``train_sd3_pr.py``:613-617); a
    number keeps that many, chosen by a seeded permutation (SD1.5 ``anchor_row_max_ratio``,
    ``train_grpo_pr.py``:1652-1668)."""
    k = tree.extras["k"]
    root = tree.segments[0]
    cand = [(b, i) for b in range(root.batch_size) for i in range(len(k) - 1) if k[i] == 0]
    n = len(cand) if max_rows is None else min(int(max_rows), len(cand))
    if n == 0:
        return None
    pick = torch.arange(len(cand)) if n == len(cand) else \
        torch.randperm(len(cand), generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
    b = torch.tensor([cand[p][0] for p in pick])
    i = torch.tensor([cand[p][1] for p in pick])
    z = lambda a: a[b, i]  # noqa: E731
    return Transitions(x=z(root.states[:, :-1]), x_next=z(root.states[:, 1:]), noise=z(root.noises),
                       mean=z(root.means), out_behaviour=z(root.outputs), log_prob=z(root.log_probs),
                       step=i, stochastic=torch.zeros(n, dtype=torch.bool), sample=b,
                       cond=None if root.cond is None else root.cond[b])


# ---- from a tree to a training batch ----------------------------------------------------------------
def to_batch(tree: Tree, reward, **extras):
    """Query the reward once per leaf and wrap the tree's rows as a ``method.Batch``: ``rewards``
    and ``cond`` are per leaf; ``extras`` carries the tree, the leaf node ids, the NFE count
    (per-sample network evaluations; ``nfe_cfg`` with the CFG doubling, derivations §9.5) and the
    number of reward queries."""
    leaves = tree.leaves
    cond = None if tree.cond is None else tree.cond[leaves]
    rewards = reward(tree.final(leaves), cond)
    ex = {"tree": tree, "leaves": leaves, "nfe": tree.nfe, "nfe_cfg": tree.nfe * (2 if tree.cfg else 1),
          "reward_queries": int(leaves.numel()), **extras}
    return Batch(rollout=tree.segments[0], rows=tree.rows(), rewards=rewards, cond=cond, extras=ex)


def node_advantages(tree: Tree, values: torch.Tensor, nodes: torch.Tensor, level: torch.Tensor, strategy: str,
                    eps: float = 1e-4, clip: float | None = 5.0, unbiased: bool = False,
                    zero_std_below: float | None = None) -> torch.Tensor:
    """(M,) advantages: `values` of `nodes` standardised within their groups (``group_ids`` with
    the given level), std + eps (``group_advantages``: population std, or the unbiased one, and
    A = 0 below ``zero_std_below``), clipped to ±clip; 0 for the other nodes. A group whose values are
    all equal gets A = 0 exactly."""
    g = group_ids(strategy, level, tree.root[nodes], None if tree.cond is None else tree.cond[nodes])
    adv = torch.zeros(tree.num_nodes, dtype=values.dtype)
    adv[nodes] = group_advantages(values, g, normalize=True, eps=eps, clip=clip, unbiased=unbiased,
                                  zero_std_below=zero_std_below)
    return adv
