"""geneval_tiny: GenEval's strict compositional score on the shapes world, from a detector trained in-repo.

GenEval (Ghosh et al. 2023, arXiv 2310.11513; djghosh13/geneval evaluation/evaluate_images.py@16f1681)
detects objects with Mask2Former, classifies their colours with CLIP and scores an image 1 if every
clause of its prompt holds. Here the world is ``rsmbench.data.shapes`` and the detector is a small
CNN trained in-repo on rendered scenes with their exact labels (``python -m rewards.shapes``):

* **detector**: 32×32 RGB in [−1, 1] → a categorical distribution over {empty} ∪ SHAPES × COLORS
  for each of the 4×4 cells of the lattice (strided convolutions, one output per cell; cross-entropy
  to the rendered label). Trained on random and prompt-driven scenes, 60 % of them degraded (blur,
  noise, colour/contrast shifts, smooth blotches: what tiny generators' samples look like);
* **strict** ``geneval_tiny`` (black box, ``differentiable = False``): decode each cell's most
  probable class into a label and check the prompt with the same ``satisfies`` that defines the
  ground truth: 1 if every constraint holds, else 0;
* **smooth** ``geneval_tiny_soft`` (``differentiable = True``): log P(the constraints hold) with the
  cells independent under the detector's distributions p_c: "≥ 1 of S" = 1 − Π_c (1 − q_c(S)) with
  q_c(S) = Σ_{k∈S} p_c(k); two such clauses by inclusion–exclusion (exact: their type sets are
  disjoint); "exactly N" the Poisson-binomial probability (exact); "A <rel> B" the noisy-OR
  1 − Π_{i,j: rel(i,j)} (1 − q_i(A)·q_j(B)) over the cell pairs with the relation (an approximation:
  it treats the pairs as independent). log P ≥ log ½ agrees with the strict score wherever the
  detector is confident (tests/test_shapes.py).

* **audit** (eval only): a second detector, ``AUDIT_RECIPE`` (another seed, so other scenes, initialisation,
  degradations and batches; width 16 for 24; and periodic ``texture`` on 30 % of its training images, so that it
  reads a grid texture over the background as background, as a person does), scores the same eval samples as
  ``audit/<category>``. No method ever sees it, so accuracy well above its audit means the training detector is
  being fooled (Goodhart). 352 samples, training detector / audit: base diffusion 0.32 / 0.34, base flow
  0.33 / 0.30, DRaFT at 10× the bench's budget 0.48 / 0.28. On held-out renders it is ≥ 98.6 % right (clean,
  degraded, textured); on the base models' samples, ambiguous where a shape is malformed, the two detectors agree
  on 88–90 % of the pass/fail calls. Its texture is one the audit knows; a hack of another kind can fool both.

Both expose ``features(x)`` (the detector's last hidden map, 96 × 4 × 4, flattened: diversity and
prior-preservation metrics) and ``eval_metrics(x, cond)``: GenEval's protocol, the strict accuracy
per category of the prompts and "overall" = their mean (GenEval's summary_scores.py averages the
categories). The weights are committed (``rewards/weights/shapes_detector.safetensors``, and
``shapes_audit_detector.safetensors``: ``python -m rewards.shapes --audit``, 16 min on 1 thread beside a
bench), each with a JSON card holding the recipe, the held-out agreement with the exact labels per category
(clean and degraded renders; textured ones too for the audit) and the file's sha256, verified on every load.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewards import register_reward
from rsmbench.core.checkpoints import sha256
from rsmbench.data import shapes as S
from rsmbench.errors import MissingWeights

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_PATH = os.path.join(HERE, "weights", "shapes_detector.safetensors")
AUDIT_WEIGHTS_PATH = os.path.join(HERE, "weights", "shapes_audit_detector.safetensors")  # AUDIT_RECIPE
TITLE = "geneval (tiny): exact-label compositional accuracy"
NUM_CLASSES = 1 + S.NUM_TYPES  # empty + shape × colour
CELLS = S.GRID * S.GRID


# ---- the detector ------------------------------------------------------------------------------
class Detector(nn.Module):
    """(B, 3, 32, 32) in [−1, 1] → logits (B, NUM_CLASSES, 4, 4), one distribution per cell."""

    def __init__(self, width: int = 24):
        super().__init__()
        c = width

        def conv(i, o, s=1):
            return [nn.Conv2d(i, o, 3, stride=s, padding=1), nn.SiLU()]

        self.body = nn.Sequential(*conv(3, c), *conv(c, 2 * c, 2), *conv(2 * c, 2 * c),        # 32 → 16
                                  *conv(2 * c, 4 * c, 2), *conv(4 * c, 4 * c),                  # → 8
                                  *conv(4 * c, 4 * c, 2), nn.Conv2d(4 * c, 4 * c, 1), nn.SiLU())  # → 4
        self.head = nn.Conv2d(4 * c, NUM_CLASSES, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_detector(path: str = WEIGHTS_PATH) -> Detector:
    """The committed detector, after checking its sha256 against the card (MissingWeights otherwise)."""
    from safetensors.torch import load_file

    card_path = os.path.splitext(path)[0] + ".json"
    fix = "restore it from git or retrain: python -m rewards.shapes"
    if not os.path.exists(path) or not os.path.exists(card_path):
        raise MissingWeights(f"geneval (tiny) detector weights missing ({path}); {fix}")
    card = json.load(open(card_path))
    got = sha256(path)
    if got != card["sha256"]:
        raise MissingWeights(f"{path}: sha256 {got[:12]}… does not match the card's {card['sha256'][:12]}… "
                             f"(corrupted or modified file); {fix}")
    net = Detector(**card["recipe"]["net"])
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)


# ---- scoring a prompt from the cell distributions -------------------------------------------------------
def decode(logits: torch.Tensor) -> np.ndarray:
    """(B, GRID, GRID) object types (0 = empty): each cell's most probable class."""
    return logits.argmax(1).cpu().numpy()


def strict_scores(logits: torch.Tensor, specs) -> torch.Tensor:
    """(B,) 1.0 / 0.0: does the decoded scene satisfy spec b? (the ground truth's own checker)"""
    cells = decode(logits)
    return torch.tensor([float(S.satisfies(S.label_from_cells(c), s)) for c, s in zip(cells, specs)])


def _log_at_least_one(q: torch.Tensor) -> torch.Tensor:
    """log(1 − Π_c (1 − q_c)), stable for small and large products (q: (n, CELLS))."""
    none = torch.log1p(-q.clamp(max=1 - 1e-15)).sum(-1)  # log P(no cell of the class)
    return torch.log((-torch.expm1(none)).clamp_min(1e-300))


def _count_pmf(q: torch.Tensor, n_max: int) -> torch.Tensor:
    """(n, n_max + 1): P(#cells of the class = k) for k < n_max, P(≥ n_max) last (Poisson-binomial)."""
    pmf = torch.zeros(q.shape[0], n_max + 1, dtype=q.dtype, device=q.device)
    pmf[:, 0] = 1.0
    for c in range(q.shape[1]):
        qc = q[:, c:c + 1]
        shifted = torch.cat([torch.zeros_like(pmf[:, :1]), pmf[:, :-1]], 1)
        top = torch.zeros_like(pmf)
        top[:, -1] = pmf[:, -1] * qc[:, 0]  # ≥ n_max stays ≥ n_max
        pmf = pmf * (1 - qc) + shifted * qc
        pmf = pmf + top
    return pmf


def _mask(spec: S.Spec) -> torch.Tensor:
    m = torch.zeros(len(spec.clauses), NUM_CLASSES, dtype=torch.float64)
    for k, cl in enumerate(spec.clauses):
        m[k, cl.types()] = 1.0
    return m


def log_prob_of(probs: torch.Tensor, spec: S.Spec) -> torch.Tensor:
    """log P(spec holds) for cell distributions ``probs`` (n, NUM_CLASSES, CELLS), float64."""
    q = torch.einsum("nkc,jk->njc", probs, _mask(spec).to(probs.device))  # (n, clauses, CELLS)
    if spec.relation is not None:
        R = torch.from_numpy(S.relation_matrix(spec.relation)).to(probs)
        pair = q[:, 0, :, None] * q[:, 1, None, :] * R  # q_i(A)·q_j(B) where i rel j
        return _log_at_least_one(pair.flatten(1))
    if len(spec.clauses) == 2:  # inclusion–exclusion; the clauses' type sets are disjoint
        assert all(c.count == 1 and not c.exact for c in spec.clauses)
        none = torch.log1p(-q.clamp(max=1 - 1e-15)).sum(-1)  # log P(no A), log P(no B)
        neither = torch.log1p(-(q[:, 0] + q[:, 1]).clamp(max=1 - 1e-15)).sum(-1)
        p = 1 - none.exp().sum(-1) + neither.exp()
        return p.clamp_min(1e-300).log()
    (cl,) = spec.clauses
    if cl.count == 1 and not cl.exact:
        return _log_at_least_one(q[:, 0])
    pmf = _count_pmf(q[:, 0], cl.count + 1)
    p = pmf[:, cl.count] if cl.exact else pmf[:, cl.count:].sum(-1)
    return p.clamp_min(1e-300).log()


def log_probs(logits: torch.Tensor, specs) -> torch.Tensor:
    """(B,) log P(spec_b holds), float64, differentiable in the logits."""
    probs = logits.double().softmax(1).flatten(2)  # (B, NUM_CLASSES, CELLS), cell index = row·GRID + col
    out = torch.zeros(len(specs), dtype=torch.float64, device=logits.device)
    groups: dict = {}
    for b, s in enumerate(specs):
        groups.setdefault(s, []).append(b)
    for spec, idx in groups.items():
        idx_t = torch.tensor(idx, device=logits.device)
        out = out.index_put((idx_t,), log_prob_of(probs[idx_t], spec))
    return out


def category_accuracy(ok: torch.Tensor, specs, prefix: str) -> dict[str, float]:
    """``prefix/<category>``: the pass rate of each category present; ``prefix/overall``: their mean (GenEval's
    summary_scores.py averages the categories, not the images)."""
    cats = np.array([s.category for s in specs])
    out = {f"{prefix}/{c}": float(ok[torch.from_numpy(cats == c)].float().mean())
           for c in S.CATEGORIES if (cats == c).any()}
    out[f"{prefix}/overall"] = float(np.mean(list(out.values())))
    return out


# ---- the rewards ------------------------------------------------------------------------------------
class GenevalTiny:
    """Strict: reward(x, cond) = 1 if the decoded scene satisfies prompt cond, else 0 (black box)."""

    name = "geneval_tiny"
    title = TITLE
    differentiable = False
    pass_threshold = 0.5  # sample grids caption each image ✓ (reward 1) or ✗ (0) and frame it green or red

    def __init__(self, prompts, weights: str = WEIGHTS_PATH, audit: str | None = AUDIT_WEIGHTS_PATH):
        """``prompts``: the task's prompt table (prompt id = index); ``weights``: the detector; ``audit``: the
        eval-only audit detector (None: none) (relative paths: from the repository root; JSON cards beside them)."""
        def resolve(path):
            return path if os.path.isabs(path) else os.path.join(os.path.dirname(HERE), path)

        self.specs = [S.parse(str(p)) for p in prompts]
        self.detector = load_detector(resolve(weights))
        self.audit = load_detector(resolve(audit)) if audit else None

    def _specs(self, cond) -> list:
        if cond is None:
            raise ValueError("geneval (tiny) scores an image against its prompt: pass the prompt ids")
        ids = cond.tolist() if torch.is_tensor(cond) else list(cond)
        return [self.specs[i] for i in ids]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, S.SIZE, S.SIZE):
            raise ValueError(f"geneval (tiny) needs (B, 3, {S.SIZE}, {S.SIZE}) images, got {tuple(x.shape)}")
        return self.detector.to(x.device)(x.float())

    @torch.no_grad()
    def passed(self, x: torch.Tensor, cond) -> torch.Tensor:
        return strict_scores(self.logits(x), self._specs(cond)).to(x.device)

    def log_prob(self, x: torch.Tensor, cond) -> torch.Tensor:
        return log_probs(self.logits(x), self._specs(cond)).to(x.dtype)

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.passed(x, cond).to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.to(x.device).features(x.float()).flatten(1).to(x.dtype)

    @torch.no_grad()
    def eval_metrics(self, x: torch.Tensor, cond) -> dict[str, float]:
        """GenEval's summary: strict accuracy per category and ``accuracy/overall`` = their mean; the same from
        the audit detector as ``audit/<category>`` and ``audit/overall``. The audit never gives a reward or a
        gradient, so ``accuracy`` well above ``audit`` means the training detector is being fooled."""
        specs = self._specs(cond)
        out = category_accuracy(self.passed(x, cond).cpu(), specs, "accuracy")
        if self.audit is not None:
            out.update(category_accuracy(self.audit_passed(x, cond).cpu(), specs, "audit"))
        return out

    @torch.no_grad()
    def eval_outcomes(self, x: torch.Tensor, cond) -> dict:
        """The per-sample form of ``eval_metrics``: each sample's category (``strata``) and its 0/1 pass by each
        detector (``scores``, keyed as the overall metric they average to: the mean over categories of the
        per-category means is ``eval_metrics``' value). The bench logs it per eval, and the summary's paired test
        against the base model resamples it (rsmbench.analysis.stats.paired_difference)."""
        scores = {"accuracy/overall": self.passed(x, cond).cpu().int().tolist()}
        if self.audit is not None:
            scores["audit/overall"] = self.audit_passed(x, cond).cpu().int().tolist()
        return {"strata": [s.category for s in self._specs(cond)], "scores": scores}

    @torch.no_grad()
    def audit_passed(self, x: torch.Tensor, cond) -> torch.Tensor | None:
        """The strict score by the audit detector (None without one)."""
        if self.audit is None:
            return None
        return strict_scores(self.audit.to(x.device)(x.float()), self._specs(cond)).to(x.device)


class GenevalTinySoft(GenevalTiny):
    """Smooth: reward(x, cond) = log P(every constraint of prompt cond holds), differentiable.

    ``augment`` K > 0: the mean of log P over K random ``degrade`` copies of each image (an expectation over
    transformations), so that a pattern the detector reads only on clean pixels, such as the 2×2 texture DRaFT
    finds, earns less. Its stream is seeded by ``augment_seed`` and advances with every call. Measured (DRaFT at 10×
    the bench's budget, lr 1e-4, seed 0, 352 samples, training detector / audit): augment 4 gives 0.44 / 0.38, the
    plain reward 0.48 / 0.28, the base model 0.32 / 0.34. The texture stays (2×2 roughness 0.15, base 0.12)."""

    name = "geneval_tiny_soft"
    title = "geneval (tiny, soft): log-probability that the prompt's constraints hold"
    differentiable = True

    def __init__(self, prompts, weights: str = WEIGHTS_PATH, audit: str | None = AUDIT_WEIGHTS_PATH,
                 augment: int = 0, augment_seed: int = 0):
        super().__init__(prompts, weights, audit)
        self.augment, self._gen = int(augment), torch.Generator().manual_seed(int(augment_seed))

    def log_prob(self, x: torch.Tensor, cond) -> torch.Tensor:
        if not self.augment:
            return super().log_prob(x, cond)
        copies = [degrade(x, self._gen).to(x.device) for _ in range(self.augment)]
        return torch.stack([super(GenevalTinySoft, self).log_prob(c, cond) for c in copies]).mean(0)

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.log_prob(x, cond)


@register_reward("geneval_tiny")
def geneval_tiny(**cfg) -> GenevalTiny:
    return GenevalTiny(**cfg)


@register_reward("geneval_tiny_soft")
def geneval_tiny_soft(**cfg) -> GenevalTinySoft:
    return GenevalTinySoft(**cfg)


# ---- degradations (training augmentation and the validity check) ------------------------------------------
def degrade(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Per-sample random degradations of images in [−1, 1], each applied with probability ½:
    Gaussian blur (σ ≤ 1.2 px), smooth blotches (a 4×4 field upsampled, amplitude ≤ 0.2), colour
    gain/offset (±15 % / ±0.1) and Gaussian noise (σ ≤ 0.15); ``strength`` scales every range."""
    B = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(B, *shape, generator=gen)

    def on():
        return (torch.rand(B, generator=gen) < 0.5).float()

    y = x.float()
    sigma = (u(0.2, 1.2) * strength * on()).clamp_min(1e-3)
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B·3, 7)
    z = F.pad(y.reshape(1, B * 3, S.SIZE, S.SIZE), (3, 3, 3, 3), mode="replicate")
    z = F.conv2d(z, k[:, None, None, :], groups=B * 3)
    z = F.conv2d(z, k[:, None, :, None], groups=B * 3)
    y = z.reshape(B, 3, S.SIZE, S.SIZE)
    blot = F.interpolate(torch.randn(B, 3, 4, 4, generator=gen), size=(S.SIZE, S.SIZE), mode="bicubic",
                         align_corners=False)
    y = y + blot * u(0, 0.2, 1, 1, 1) * strength * on()[:, None, None, None]
    gain = 1 + (u(-0.15, 0.15, 3, 1, 1) * strength) * on()[:, None, None, None]
    offset = u(-0.1, 0.1, 3, 1, 1) * strength * on()[:, None, None, None]
    y = y * gain + offset
    y = y + torch.randn(y.shape, generator=gen) * (u(0, 0.15) * strength * on())[:, None, None, None]
    return y.clamp(-1, 1).to(x.dtype)


def texture(x: torch.Tensor, gen: torch.Generator, amplitude: float = 0.6) -> torch.Tensor:
    """Images in [−1, 1] under a periodic pattern: a random tile of 2, 3 or 4 px per side (each pixel and channel
    uniform in ±1), repeated over the image at a random phase and scaled by an amplitude uniform in [0, amplitude];
    the grid textures a fine-tuned generator puts on its samples (DRaFT on shapes), which a person reads as
    background."""
    B = x.shape[0]
    y = x.float().clone()
    period = torch.randint(2, 5, (B,), generator=gen)
    amp = amplitude * torch.rand(B, generator=gen)
    for b in range(B):
        p = int(period[b])
        tile = 2 * torch.rand(3, p, p, generator=gen) - 1
        shift = torch.randint(p, (2,), generator=gen).tolist()
        reps = S.SIZE // p + 2
        pattern = tile.repeat(1, reps, reps)[:, shift[0]:shift[0] + S.SIZE, shift[1]:shift[1] + S.SIZE]
        y[b] = y[b] + amp[b] * pattern
    return y.clamp(-1, 1).to(x.dtype)


# ---- training and validity (reproducible: python -m rewards.shapes) ------------------------------------------
RECIPE = dict(
    seed=0, net=dict(width=24), train_scenes=40000, steps=4000, batch=128, lr=2e-3, weight_decay=1e-4,
    optimizer="AdamW, cosine schedule", degraded_fraction=0.6,
    scenes="half random (1–4 objects, uniform types, half of them a single type), half drawn for a "
           "uniformly chosen prompt of a uniformly chosen category (rsmbench.data.shapes.scene_for)",
    heldout=dict(seed=1, per_category=500, degrade_seed=2),
)


# The audit detector: scores eval samples only and never gives a reward, so a gap between its accuracy and the
# training detector's shows a reward being fooled (Goodhart). Another seed (its own scenes, init, degradations
# and batches) and width, the same held-out check.
AUDIT_RECIPE = dict(RECIPE, seed=7, net=dict(width=16), steps=3000, textured_fraction=0.3,
                    textures="a periodic tile of 2–4 px, amplitude ≤ 0.6 (texture), on 30 % of the training images "
                             "and on top of their degradations",
                    heldout=dict(RECIPE["heldout"], texture_seed=3))


def training_scenes(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    pools = [S.all_prompts(c) for c in S.CATEGORIES]
    out = []
    for k in range(n):
        if k % 2 == 0:
            out.append(S.random_scene(rng))
        else:
            pool = pools[int(rng.integers(len(pools)))]
            out.append(S.scene_for(pool[int(rng.integers(len(pool)))], rng))
    return out


def heldout_set(category: str, n: int, seed: int):
    """n (scene, prompt) pairs of a category: for half of them the scene is drawn for the prompt
    (it satisfies it), for the other half for another prompt of the category (it mostly does not)."""
    rng = np.random.default_rng([seed, S.CATEGORIES.index(category)])
    pool = S.all_prompts(category)
    scenes, prompts = [], []
    for k in range(n):
        p = pool[int(rng.integers(len(pool)))]
        src = p if k % 2 == 0 else pool[int(rng.integers(len(pool)))]
        scenes.append(S.scene_for(src, rng))
        prompts.append(p)
    return scenes, prompts


@torch.no_grad()
def agreement(net: Detector, scenes, prompts, degrade_seed: int | None = None, texture_seed: int | None = None) -> dict:
    """Agreement of the strict score with the exact labels, and the exact-scene decoding rate."""
    x = S.to_tensor([S.render(s) for s in scenes])
    if degrade_seed is not None:
        x = degrade(x, torch.Generator().manual_seed(degrade_seed))
    if texture_seed is not None:
        x = texture(x, torch.Generator().manual_seed(texture_seed))
    logits = torch.cat([net(x[i:i + 256]) for i in range(0, len(x), 256)])
    specs = [S.parse(p) for p in prompts]
    truth = torch.tensor([float(S.satisfies(s, p)) for s, p in zip(scenes, specs)])
    got = strict_scores(logits, specs)
    soft = log_probs(logits, specs) >= math.log(0.5)
    cells = decode(logits)
    exact = np.mean([np.array_equal(c, S.cell_label(s.objects)) for c, s in zip(cells, scenes)])
    return {"agreement": float((got == truth).float().mean()), "positives": float(truth.mean()),
            "scene_exact": float(exact), "soft_threshold_agrees": float((soft == got.bool()).float().mean())}


def validity(net: Detector, per_category: int, seed: int, degrade_seed: int, texture_seed: int | None = None) -> dict:
    """Per category: agreement on clean and degraded held-out renders, and (``texture_seed``) on textured ones."""
    out = {}
    for c in S.CATEGORIES:
        scenes, prompts = heldout_set(c, per_category, seed)
        out[c] = {"clean": agreement(net, scenes, prompts),
                  "degraded": agreement(net, scenes, prompts, degrade_seed)}
        if texture_seed is not None:
            out[c]["textured"] = agreement(net, scenes, prompts, texture_seed=texture_seed)
    return out


def train_detector(out_path: str = WEIGHTS_PATH, log=print, recipe: dict = RECIPE) -> dict:
    """Train the detector with ``recipe``; write safetensors + card (recipe, validity, sha256)."""
    import time

    from safetensors.torch import save_file

    r = recipe
    torch.manual_seed(r["seed"])
    t0 = time.time()
    scenes = training_scenes(r["train_scenes"], r["seed"])
    x_all = S.to_tensor([S.render(s) for s in scenes])
    y_all = torch.from_numpy(np.stack([S.cell_label(s.objects) for s in scenes]))
    log(f"rendered {len(scenes)} training scenes ({time.time() - t0:.0f} s)")
    net = Detector(**r["net"])
    opt = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, r["steps"])
    g = torch.Generator().manual_seed(r["seed"])
    for step in range(r["steps"]):
        idx = torch.randint(len(x_all), (r["batch"],), generator=g)
        x, y = x_all[idx], y_all[idx]
        bad = torch.rand(len(x), generator=g) < r["degraded_fraction"]
        x = torch.where(bad[:, None, None, None], degrade(x, g), x)
        if r.get("textured_fraction"):
            tex = torch.rand(len(x), generator=g) < r["textured_fraction"]
            x = torch.where(tex[:, None, None, None], texture(x, g), x)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == r["steps"] - 1:
            log(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    net.eval()
    h = r["heldout"]
    metrics = validity(net, h["per_category"], h["seed"], h["degrade_seed"], h.get("texture_seed"))
    for c, m in metrics.items():
        log(f"{c:14s} " + "  ".join(f"{k} {v['agreement']:.4f} (scene exact {v['scene_exact']:.4f})"
                                    for k, v in m.items()))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out_path)
    card = dict(title=TITLE, recipe=r, validity=metrics, torch=torch.__version__,
                train_seconds=round(time.time() - t0, 1), sha256=sha256(out_path))
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(card, f, indent=1)
    return card


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)  # reproducible and kind to a shared machine
    if sys.argv[1:] == ["--audit"]:
        train_detector(AUDIT_WEIGHTS_PATH, recipe=AUDIT_RECIPE)
    elif sys.argv[1:]:
        sys.exit("usage: python -m rewards.shapes [--audit]")
    else:
        train_detector()
