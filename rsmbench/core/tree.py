"""Branching trees and stochasticity localisation for the zeroth-order samplers (digest §4.2, §9.3–9.5).

Two tree shapes, both built by restarting ``rollout.sample`` from stored states:

- **Localised branches** (TempFlow-GRPO, arXiv 2508.04324; RSM "Ours", digest §9.3–9.4): one
  deterministic ODE root per seed; at each transition i with k_i > 0, k_i children restart from
  the root state x_i, take ONE stochastic step (the only True entry of their ``stochastic`` mask)
  and continue with the ODE to the end. Each child is a leaf; its single SDE transition is its
  training row. Per root (§9.5):  NFE = N + Σ_i k_i + Σ_i k_i·(N − i − 1)  (×2 with CFG).
- **Branching trees** (Branch-GRPO, arXiv 2509.06040 §3.2): every node runs the (SDE-window)
  sampler over its segment; at split step s_j every frontier node spawns k_j children that share
  its prefix and draw their own noise from step s_j on. Leaves = Π_j k_j per root, and
  NFE per root = Σ_j (Π_{l≤j} k_l)·(s_{j+1} − s_j)  with s_0 = 0, k_0 = 1, s_{m+1} = N.

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
    code's 10-entry lists for N = 10, digest §9.4)."""
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
    continued by the ODE (digest §4.2 "stochasticity localization", §9.3–9.4)."""
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


def branching_tree(policy, shape, cond, seeds, split_steps, ks, stochastic=None, dtype=torch.float32) -> Tree:
    """Branch-GRPO tree: the root runs [0, s_1); at each split s_j every frontier node spawns k_j
    children that continue over [s_j, s_{j+1}) with their own noise (arXiv 2509.06040 §3.2).
    ``stochastic`` (default: all SDE) localises the noise to a window (``sde_window``)."""
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
        ro = _segment(policy, shape, gens, None if cond is None else cond[r], stochastic, x0, s, e, dtype)
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
                cfg=_uses_cfg(policy, cond), extras={"split_steps": split_steps, "ks": ks})


# ---- rewards up the tree, groups, KL-anchor rows ------------------------------------------------
def fuse_rewards(parent: torch.Tensor, leaves: torch.Tensor, leaf_rewards: torch.Tensor,
                 node_log_prob: torch.Tensor | None = None, mode: str = "mean") -> torch.Tensor:
    """Value of every node from its descendant leaves (Branch-GRPO reward fusion, arXiv
    2509.06040 §3.3). ``mean``: uniform average of the descendant leaves' rewards. ``path_prob``:
    weights ∝ exp(Σ of ⟨log p⟩ along the path from the node down to the leaf), i.e. a softmax of
    the path log-likelihoods below the node (our reading of the paper's path-probability
    weighting). A leaf's value is its reward."""
    if mode not in ("mean", "path_prob"):
        raise ValueError(f"fusion mode must be 'mean' or 'path_prob', got {mode!r}")
    M = parent.numel()
    lp = torch.zeros(M, dtype=torch.float64) if node_log_prob is None else node_log_prob.to(torch.float64)
    values = torch.zeros(M, dtype=torch.float64)
    num = {n: [] for n in range(M)}  # node -> [(log-weight below node, reward)]
    for leaf, r in zip(leaves.tolist(), leaf_rewards.to(torch.float64).tolist()):
        below, n = 0.0, leaf
        while n >= 0:
            num[n].append((below, r))
            below += float(lp[n])
            n = int(parent[n])
    for n, lst in num.items():
        if not lst:
            continue
        logw = torch.tensor([w for w, _ in lst], dtype=torch.float64)
        w = torch.softmax(logw, 0) if mode == "path_prob" else torch.full_like(logw, 1 / len(lst))
        values[n] = (w * torch.tensor([r for _, r in lst], dtype=torch.float64)).sum()
    return values.to(leaf_rewards.dtype)


def group_ids(strategy: str, level: torch.Tensor, root: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Group id per node for advantage normalisation (RSM code ``group_strategy``, digest §9.3–9.4):
    ``prompt`` → (prompt, level), ``seed`` → (root, level) i.e. siblings, ``batch`` → (level).
    `level` is the branch step (localised trees) or the depth (branching trees)."""
    if strategy not in GROUP_STRATEGIES:
        raise ValueError(f"group strategy must be one of {GROUP_STRATEGIES}, got {strategy!r}")
    first = {"prompt": cond if cond is not None else torch.zeros_like(root), "seed": root,
             "batch": torch.zeros_like(root)}[strategy]
    return torch.unique(torch.stack([first.long(), level.long()], dim=1), dim=0, return_inverse=True)[1]


def kl_anchor_rows(tree: Tree, frac: float, n_rows: int, seed: int = 0) -> Transitions | None:
    """ODE-KL-anchor rows (RSM code ``use_ode_kl_anchor``, digest §6, §9.3): deterministic root
    states at transitions that carry no branch (k_i = 0) and are not the final one, at most
    ⌊frac·n_rows⌋ of them, chosen by a seeded permutation."""
    k = tree.extras["k"]
    root = tree.segments[0]
    cand = [(b, i) for b in range(root.batch_size) for i in range(len(k) - 1) if k[i] == 0]
    n = min(int(frac * n_rows), len(cand))
    if n == 0:
        return None
    pick = torch.randperm(len(cand), generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
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
    (per-sample network evaluations; ``nfe_cfg`` with the CFG doubling, digest §9.5) and the
    number of reward queries."""
    leaves = tree.leaves
    cond = None if tree.cond is None else tree.cond[leaves]
    rewards = reward(tree.final(leaves), cond)
    ex = {"tree": tree, "leaves": leaves, "nfe": tree.nfe, "nfe_cfg": tree.nfe * (2 if tree.cfg else 1),
          "reward_queries": int(leaves.numel()), **extras}
    return Batch(rollout=tree.segments[0], rows=tree.rows(), rewards=rewards, cond=cond, extras=ex)


def node_advantages(tree: Tree, values: torch.Tensor, nodes: torch.Tensor, level: torch.Tensor, strategy: str,
                    eps: float = 1e-4, clip: float | None = 5.0) -> torch.Tensor:
    """(M,) advantages: `values` of `nodes` standardised within their groups (``group_ids`` with
    the given level), population std + eps (GRPO, arXiv 2402.03300, Eq. 3), clipped to ±clip;
    0 for the other nodes. A group whose values are all equal gets A = 0 exactly."""
    g = group_ids(strategy, level, tree.root[nodes], None if tree.cond is None else tree.cond[nodes])
    adv = torch.zeros(tree.num_nodes, dtype=values.dtype)
    adv[nodes] = group_advantages(values, g, normalize=True, eps=eps, clip=clip)
    return adv
