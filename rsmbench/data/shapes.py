"""shapes: a GenEval in miniature — rendered scenes with exact labels, text prompts and their checker.

GenEval (Ghosh et al. 2023, arXiv 2310.11513) scores text-to-image models with an object detector on
six prompt categories. This module is its world at 32×32 px, where the label of every image is known
exactly because the image is rendered from it.

**Scenes.** 1 to 4 objects from SHAPES × COLORS on a light grey background with a gentle linear
gradient. The canvas is a GRID × GRID lattice of CELL-px cells; an object occupies one cell: a filled
shape of side ``size`` ∈ OBJECT_SIZES px whose box lies inside the cell's first SLOT px, at a random
offset, so two objects never touch (≥ 1 px gap) and every object has a unique cell. Object colours
are the palette ± a small jitter. Rendering is a pure function of the label and the background
parameters (``render``); ``random_scene`` / ``scene_for`` draw them from a numpy Generator, so a seed
fixes the image. Images follow the project's convention: uint8 RGB → float (3, H, W) in [−1, 1]
(x = u8/127.5 − 1, as ``rsmbench.data.images``).

**Prompts** (GenEval's templates, prompts/create_prompts.py of djghosh13/geneval@5348fb5, without
"a photo of"; counting and position also name a colour, as in issue 13's examples):
    single_object  "a circle"                 ≥ 1 circle
    two_object     "a circle and a square"    ≥ 1 circle and ≥ 1 square
    counting       "three green triangles"    exactly 3 green triangles
    colors         "a yellow square"          ≥ 1 yellow square
    position       "a red circle to the left of a blue square"  (… to the right of / above / below)
                   a red circle and a blue square with that relation
    color_attr     "a blue circle and a red triangle"  ≥ 1 of each
``parse`` turns a prompt into a ``Spec`` (clauses and relation); ``satisfies(label, prompt)`` checks it.

**Relations** are GenEval's ``relative_position`` (evaluation/evaluate_images.py@16f1681:99–117):
with centre offset d = c_A − c_B and box sizes w_A, w_B, d' = sign(d)·max(|d| − 0.1·(w_A + w_B), 0),
(dx, dy) = d'/‖d‖; "left of" if dx < −0.5, "right of" if dx > 0.5, "above" if dy < −0.5, "below" if
dy > 0.5 (image rows grow downwards). Deviation: it is computed on the objects' cells (centres at the
cell indices, boxes of one cell), not on pixel boxes, so the relation is a function of the cells,
which the reward's detector predicts exactly. Deviation: GenEval checks colour and position on the
most confident detections only; with exact labels "≥ 1 matching object" (and "some matching pair"
for position) is the well-defined reading.

**Prompt lists** (``prompt_lists``; written by ``python -m rsmbench.data.shapes`` to
tasks/prompts/shapes_train.txt and shapes_eval.txt as ``category<TAB>prompt`` lines, parsed by
``read_prompt_file``): per category, the eval prompts are held out from the train prompts, except
single_object (only len(SHAPES) prompts exist: both lists hold all three) and two_object (three
unordered pairs: train has one word order, eval the other).

**Pretraining data** (``@register_data("shapes")``): (scene, prompt id) pairs over a task's prompt
table, the category drawn from ``weights`` (skewed toward single objects, so the base model is
imperfect on the compositional categories), the prompt uniformly within it, and a fresh scene that
satisfies the prompt and holds nothing else (``scene_for``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from rsmbench.data.sources import register_data

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
PALETTE = {"red": (0.86, 0.16, 0.14), "green": (0.13, 0.64, 0.22), "blue": (0.16, 0.30, 0.88),
           "yellow": (0.96, 0.80, 0.08)}
SIZE, CELL, GRID, SLOT = 32, 8, 4, 7
OBJECT_SIZES = (5, 6, 7)
MAX_OBJECTS = 4
COLOR_JITTER = 0.06
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = {"to the left of": "left of", "to the right of": "right of", "above": "above",
             "below": "below"}
POSITION_THRESHOLD = 0.1  # GenEval's default (evaluate_images.py@16f1681:378)
# object type k = 1 + shape·|COLORS| + colour (0 = an empty cell): the reward's detector classes
NUM_TYPES = len(SHAPES) * len(COLORS)
ROOT = Path(__file__).resolve().parents[2]
PROMPTS_DIR = ROOT / "tasks" / "prompts"


# ---- labels -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, its cell (row, col), its box's top-left pixel and side."""

    shape: str
    color: str
    row: int
    col: int
    y0: int
    x0: int
    size: int

    @property
    def type(self) -> int:
        return type_index(self.shape, self.color)


def type_index(shape: str, color: str) -> int:
    return 1 + SHAPES.index(shape) * len(COLORS) + COLORS.index(color)


def type_of(k: int) -> tuple[str, str]:
    s, c = divmod(k - 1, len(COLORS))
    return SHAPES[s], COLORS[c]


def cell_label(label) -> np.ndarray:
    """(GRID, GRID) int: the object type in each cell (0 = empty); the detector's target."""
    out = np.zeros((GRID, GRID), np.int64)
    for o in label:
        out[o.row, o.col] = o.type
    return out


def label_from_cells(cells) -> tuple[Obj, ...]:
    """The objects of a (GRID, GRID) type map (boxes unknown: a one-cell box at the cell's origin)."""
    cells = np.asarray(cells)
    return tuple(Obj(*type_of(int(cells[r, c])), r, c, r * CELL, c * CELL, CELL)
                 for r in range(GRID) for c in range(GRID) if cells[r, c])


# ---- rendering ----------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool: the pixels ≥ half covered by the shape (8×8 supersampling per pixel).

    circle: the inscribed disc; square: the whole box; triangle: apex at the top centre, base the
    bottom edge (row i: the narrowest centred run of width ≥ i + 1, of the parity of ``size``)."""
    if shape == "triangle":
        out = np.zeros((size, size), bool)
        for i in range(size):
            w = i + 1 + (i + 1 + size) % 2
            out[i, (size - w) // 2:(size + w) // 2] = True
        return out
    k = 8
    u = (np.arange(size * k) + 0.5) / k  # sub-pixel centres, in pixels
    y, x = np.meshgrid(u, u, indexing="ij")
    h = size / 2
    if shape == "circle":
        inside = (x - h) ** 2 + (y - h) ** 2 <= h ** 2
    elif shape == "square":
        inside = np.ones_like(x, bool)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return inside.reshape(size, k, size, k).mean(axis=(1, 3)) >= 0.5


@dataclass(frozen=True)
class Scene:
    """A label and the rendering parameters that are not part of it."""

    objects: tuple[Obj, ...]
    background: tuple[float, float, float]  # grey level, gradient amplitude, gradient angle
    colors: tuple[tuple[float, float, float], ...]  # each object's RGB in [0, 1]


def render(scene: Scene) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 RGB image of a scene (a pure function of it)."""
    grey, amp, angle = scene.background
    v = (np.arange(SIZE) + 0.5) / SIZE - 0.5
    yy, xx = np.meshgrid(v, v, indexing="ij")
    img = np.repeat((grey + amp * (xx * math.cos(angle) + yy * math.sin(angle)))[..., None], 3, axis=2)
    for o, rgb in zip(scene.objects, scene.colors):
        m = mask(o.shape, o.size)
        img[o.y0:o.y0 + o.size, o.x0:o.x0 + o.size][m] = rgb
    return (img.clip(0, 1) * 255).round().astype(np.uint8)


def block_roughness(x: torch.Tensor) -> float:
    """The rms of the pixels about their 2×2 block's mean (over channels and blocks): the texture that the
    shapes UNets, which run on 2×2-folded pixels, can leave. Rendered scenes 0.093 (the data source's 128
    scenes of ``shapes_eval.data_roughness``); the base twins' samples 0.12–0.13 (tests/test_shapes.py)."""
    b = torch.nn.functional.pixel_unshuffle(x.float(), 2).unflatten(1, (x.shape[1], 4))
    return (b - b.mean(2, keepdim=True)).pow(2).mean().sqrt().item()


def to_tensor(imgs) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32 in [−1, 1]."""
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _place(rng: np.random.Generator, shape: str, color: str, row: int, col: int) -> Obj:
    size = int(rng.choice(OBJECT_SIZES))
    dy, dx = rng.integers(0, SLOT - size + 1, size=2)
    return Obj(shape, color, row, col, row * CELL + int(dy), col * CELL + int(dx), size)


def make_scene(rng: np.random.Generator, types, cells) -> Scene:
    """A scene with objects of the given (shape, colour) types in the given (row, col) cells."""
    objs = tuple(_place(rng, s, c, r, q) for (s, c), (r, q) in zip(types, cells))
    cols = tuple(tuple(float(v) for v in np.clip(np.asarray(PALETTE[o.color]) +
                                                 rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0, 1))
                 for o in objs)
    bg = (float(rng.uniform(0.78, 0.92)), float(rng.uniform(0.0, 0.08)), float(rng.uniform(0, 2 * math.pi)))
    return Scene(objs, bg, cols)


def _cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    return [divmod(int(k), GRID) for k in rng.choice(GRID * GRID, size=n, replace=False)]


def random_scene(rng: np.random.Generator) -> Scene:
    """1–4 objects of uniformly drawn types (with prob. ½ all of one type, for counts) in distinct cells."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    all_types = [(s, c) for s in SHAPES for c in COLORS]
    if rng.random() < 0.5:
        types = [all_types[int(rng.integers(len(all_types)))]] * n
    else:
        types = [all_types[int(k)] for k in rng.integers(len(all_types), size=n)]
    return make_scene(rng, types, _cells(rng, n))


# ---- relations ---------------------------------------------------------------------------------------
def relations(a: Obj, b: Obj) -> set[str]:
    """GenEval's relative_position of A to B (evaluate_images.py@16f1681:99–117) on their cells."""
    offset = np.array([a.col - b.col, a.row - b.row], float)  # (x, y), boxes of one cell each
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * 2.0, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


@lru_cache(maxsize=None)
def relation_matrix(rel: str) -> np.ndarray:
    """(GRID², GRID²) bool: R[i, j] = an object in cell i is `rel` an object in cell j."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    dummy = [Obj("circle", "red", r, c, 0, 0, 1) for r, c in cells]
    return np.array([[rel in relations(a, b) for b in dummy] for a in dummy])


# ---- prompts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clause:
    """≥ count (or exactly count) objects of a shape (and colour, if given)."""

    shape: str
    color: str | None = None
    count: int = 1
    exact: bool = False

    def matches(self, o: Obj) -> bool:
        return o.shape == self.shape and (self.color is None or o.color == self.color)

    def types(self) -> list[int]:
        """The object types that match (the detector's classes)."""
        return [type_index(self.shape, c) for c in COLORS if self.color in (None, c)]


@dataclass(frozen=True)
class Spec:
    """A prompt's constraints: every clause holds, and clause 0 is `relation` clause 1 (if given)."""

    category: str
    text: str
    clauses: tuple[Clause, ...]
    relation: str | None = None


_S, _C = "|".join(SHAPES), "|".join(COLORS)
_N, _R = "|".join(NUMBERS.values()), "|".join(RELATIONS)
_GRAMMAR = (
    ("single_object", re.compile(rf"a ({_S})")),
    ("two_object", re.compile(rf"a ({_S}) and a ({_S})")),
    ("counting", re.compile(rf"({_N}) ({_C}) ({_S})s")),
    ("colors", re.compile(rf"a ({_C}) ({_S})")),
    ("position", re.compile(rf"a ({_C}) ({_S}) ({_R}) a ({_C}) ({_S})")),
    ("color_attr", re.compile(rf"a ({_C}) ({_S}) and a ({_C}) ({_S})")),
)


@lru_cache(maxsize=None)
def parse(text: str) -> Spec:
    """The constraints of a prompt of the grammar (ValueError otherwise)."""
    for cat, pattern in _GRAMMAR:
        m = pattern.fullmatch(text)
        if not m:
            continue
        g = m.groups()
        if cat == "single_object":
            return Spec(cat, text, (Clause(g[0]),))
        if cat == "two_object" and g[0] != g[1]:
            return Spec(cat, text, (Clause(g[0]), Clause(g[1])))
        if cat == "counting":
            n = {v: k for k, v in NUMBERS.items()}[g[0]]
            return Spec(cat, text, (Clause(g[2], g[1], n, exact=True),))
        if cat == "colors":
            return Spec(cat, text, (Clause(g[1], g[0]),))
        if cat == "position" and g[1] != g[4]:
            return Spec(cat, text, (Clause(g[1], g[0]), Clause(g[4], g[3])), RELATIONS[g[2]])
        if cat == "color_attr" and g[1] != g[3] and g[0] != g[2]:
            return Spec(cat, text, (Clause(g[1], g[0]), Clause(g[3], g[2])))
    raise ValueError(f"not a shapes prompt: {text!r} (see rsmbench/data/shapes.py for the grammar)")


def satisfies(label, prompt) -> bool:
    """Does a scene's label (objects, or a Scene) satisfy every constraint of the prompt?"""
    spec = parse(prompt) if isinstance(prompt, str) else prompt
    objs = label.objects if isinstance(label, Scene) else tuple(label)
    for cl in spec.clauses:
        n = sum(cl.matches(o) for o in objs)
        if n < cl.count or (cl.exact and n != cl.count):
            return False
    if spec.relation is not None:
        a, b = spec.clauses
        return any(spec.relation in relations(oa, ob)
                   for oa in objs if a.matches(oa) for ob in objs if b.matches(ob))
    return True


def all_prompts(category: str) -> list[str]:
    """Every prompt of a category, in a fixed order."""
    if category == "single_object":
        return [f"a {s}" for s in SHAPES]
    if category == "two_object":
        return [f"a {a} and a {b}" for a in SHAPES for b in SHAPES if a != b]
    if category == "counting":
        return [f"{w} {c} {s}s" for w in NUMBERS.values() for c in COLORS for s in SHAPES]
    if category == "colors":
        return [f"a {c} {s}" for c in COLORS for s in SHAPES]
    if category == "position":
        return [f"a {c1} {s1} {r} a {c2} {s2}" for r in RELATIONS for c1 in COLORS for s1 in SHAPES
                for c2 in COLORS for s2 in SHAPES if s1 != s2]
    if category == "color_attr":
        return [f"a {c1} {s1} and a {c2} {s2}" for c1 in COLORS for s1 in SHAPES for c2 in COLORS
                for s2 in SHAPES if s1 != s2 and c1 != c2]
    raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")


PER_LIST = 4  # prompts per category in each list (single_object and two_object: 3)


def _covers(prompts: list[str], category: str) -> bool:
    """Does a list name every colour and shape (and every number / relation of its category)?"""
    words = " ".join(prompts)
    need = [*COLORS, *SHAPES] + {"counting": list(NUMBERS.values()), "position": list(RELATIONS)}.get(category, [])
    return all(re.search(rf"\b{w}", words) for w in need)


def prompt_lists(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) lists of (category, prompt). Per category PER_LIST prompts each, drawn (seeded)
    until each list names every colour and shape (counting: every number; position: every relation),
    the eval prompts disjoint from the train ones; except single_object (both lists hold its 3
    prompts) and two_object (train: one word order of each pair, eval: the other)."""
    rng = np.random.default_rng(seed)
    train, ev = [], []
    for cat in CATEGORIES:
        ps = all_prompts(cat)
        if cat == "single_object":
            tr, te = ps, ps
        elif cat == "two_object":
            tr = [f"a {a} and a {b}" for i, a in enumerate(SHAPES) for b in SHAPES[i + 1:]]
            te = [f"a {b} and a {a}" for i, a in enumerate(SHAPES) for b in SHAPES[i + 1:]]
        else:
            while True:
                order = rng.permutation(len(ps))
                tr = [ps[k] for k in order[:PER_LIST]]
                te = [ps[k] for k in order[PER_LIST:2 * PER_LIST]]
                if _covers(tr, cat) and _covers(te, cat):
                    break
        train += [(cat, p) for p in tr]
        ev += [(cat, p) for p in te]
    return train, ev


def write_prompt_files(out_dir: Path = PROMPTS_DIR) -> list[Path]:
    train, ev = prompt_lists()
    paths = []
    for name, rows in (("shapes_train", train), ("shapes_eval", ev)):
        p = Path(out_dir) / f"{name}.txt"
        p.write_text("".join(f"{c}\t{t}\n" for c, t in rows))
        paths.append(p)
    return paths


def read_prompt_file(path) -> list[tuple[str, str]]:
    """``category<TAB>prompt`` lines → [(category, prompt)], each checked against the grammar."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        cat, _, text = line.partition("\t")
        if parse(text).category != cat:
            raise ValueError(f"{path}: {text!r} is a {parse(text).category} prompt, not {cat}")
        rows.append((cat, text))
    return rows


# ---- scenes for a prompt ------------------------------------------------------------------------------
def scene_for(prompt, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies the prompt and holds nothing it does not ask for (free
    attributes: the colour of single/two-object prompts, sizes, cells, offsets, background)."""
    spec = parse(prompt) if isinstance(prompt, str) else prompt
    types = []
    for cl in spec.clauses:
        types += [(cl.shape, cl.color or COLORS[int(rng.integers(len(COLORS)))])] * cl.count
    if spec.relation is None:
        cells = _cells(rng, len(types))
    else:  # a uniformly drawn ordered pair of cells with the relation
        pairs = np.argwhere(relation_matrix(spec.relation))
        i, j = pairs[int(rng.integers(len(pairs)))]
        cells = [divmod(int(i), GRID), divmod(int(j), GRID)]
    return make_scene(rng, types, cells)


DEFAULT_WEIGHTS = {"single_object": 0.3, "two_object": 0.1, "counting": 0.1, "colors": 0.3,
                   "position": 0.1, "color_attr": 0.1}


@register_data("shapes")
class ShapesData:
    """Pretraining source ``shapes``: ``sample(n, generator) -> (x0 (n, 3, 32, 32) in [−1, 1], prompt ids)``.

    ``prompts``: the task's prompt table (id = index); ``weights``: the category distribution (the
    prompt is then uniform within its category, over the table's prompts of that category).
    Deterministic given the generator's state (a numpy Generator seeded from it renders the batch)."""

    def __init__(self, prompts, weights: dict | None = None):
        self.specs = [parse(p) for p in prompts]
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        bad = set(weights) - set(CATEGORIES)
        if bad:
            raise ValueError(f"unknown categories {sorted(bad)}; choose from {', '.join(CATEGORIES)}")
        self.by_cat = {c: [i for i, s in enumerate(self.specs) if s.category == c] for c in CATEGORIES}
        cats = [c for c in CATEGORIES if weights.get(c, 0) > 0 and self.by_cat[c]]
        w = np.array([weights[c] for c in cats], float)
        self.cats, self.p = cats, w / w.sum()

    def sample(self, n: int, generator: torch.Generator):
        rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=generator)))
        ids, imgs = [], []
        for cat in rng.choice(len(self.cats), size=n, p=self.p):
            members = self.by_cat[self.cats[int(cat)]]
            i = members[int(rng.integers(len(members)))]
            ids.append(i)
            imgs.append(render(scene_for(self.specs[i], rng)))
        return to_tensor(imgs), torch.tensor(ids, dtype=torch.long)


# ---- figures ------------------------------------------------------------------------------------------
if __name__ == "__main__":
    for p in write_prompt_files():
        print(f"wrote {p}")
