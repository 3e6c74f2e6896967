"""The built-in synthetic "shapes" world: the data of configs/sgt_tiny.py and of the tests. No download.

Every sample is a pure function of ``(seed, index)`` and the world settings (``config.data.sources.synthetic``):

* an RGB image of one of ``sizes`` (H, W), a flat grey ``background`` and 1..4 non-overlapping shapes
  (circle, square, triangle) in named, clearly distinct colours; shapes are drawn without anti-aliasing, so
  the pixels of a shape are exactly its instance mask;
* the instance masks, rendered into the SGT target with the shared palette rule (sgt_jax/data/render.py);
* a caption listing the shapes from left to right;
* VQA turns about count, colour, existence and relative position (and, with ``size_questions``, relative
  size) whose answers follow from the scene description by construction (``answer_*`` functions below;
  tests re-derive them from the pixels).

Relative-size questions compare the pixel areas of two uniquely described shapes and are asked only when
the larger has at least 1.5x the area of the smaller. Relative-position questions are asked only about shapes
whose extents do not overlap along the asked axis,
and colour/position questions only name shapes that their description identifies uniquely, so every
answer is unambiguous.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from sgt_jax.data import render

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (145, 60, 185),
    "orange": (245, 135, 25),
    "cyan": (40, 205, 215),
    "white": (250, 250, 250),
}
BACKGROUNDS = {"black": (20, 20, 20), "dark grey": (70, 70, 70), "grey": (120, 120, 120)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_RADIUS = 5  # pixels: below this a triangle is hard to tell from a square


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a COLOURS key
    cx: int
    cy: int
    r: int  # half extent: the shape fits [cx - r, cx + r] x [cy - r, cy + r]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1)."""
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    key: str
    height: int
    width: int
    background: str  # a BACKGROUNDS key
    shapes: tuple[Shape, ...]


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    num_samples: int = 512
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (64, 96), (96, 64))
    min_shapes: int = 1
    max_shapes: int = 4
    qa_per_sample: int = 3
    size_questions: bool = False  # also ask "Is the X bigger/smaller than the Y?" (off: the default world)

    def __post_init__(self):
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"synthetic: need 1 <= min_shapes <= max_shapes, got {self.min_shapes}, "
                             f"{self.max_shapes}")
        if self.num_samples < 1 or self.qa_per_sample < 1:
            raise ValueError("synthetic: num_samples and qa_per_sample must be >= 1")
        for h, w in self.sizes:
            if min(h, w) < 32:
                raise ValueError(f"synthetic: image sizes must be >= 32 pixels a side, got {(h, w)}")

    @classmethod
    def from_config(cls, cfg) -> "WorldConfig":
        """From ``config.data.sources.synthetic`` (a ConfigDict or a mapping)."""
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        return cls(seed=int(get("seed", 0)), num_samples=int(get("num_samples", 512)),
                   sizes=tuple((int(h), int(w)) for h, w in get("sizes", cls.sizes)),
                   min_shapes=int(get("min_shapes", 1)), max_shapes=int(get("max_shapes", 4)),
                   qa_per_sample=int(get("qa_per_sample", 3)),
                   size_questions=bool(get("size_questions", False)))


def make_scene(world: WorldConfig, index: int) -> Scene:
    """The scene of sample ``index``: shapes placed by rejection sampling with a 2-pixel gap between boxes."""
    rng = np.random.default_rng([world.seed, int(index), 0x5EA])
    h, w = world.sizes[int(rng.integers(len(world.sizes)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    n_target = int(rng.integers(world.min_shapes, world.max_shapes + 1))
    max_r = max(MIN_RADIUS, int(0.2 * min(h, w)))
    shapes: list[Shape] = []
    attempts = 0
    while len(shapes) < n_target and attempts < 200:
        attempts += 1
        r = int(rng.integers(MIN_RADIUS, max_r + 1))
        s = Shape(kind=SHAPES[int(rng.integers(len(SHAPES)))], colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                  cx=int(rng.integers(r + 1, w - r - 1)), cy=int(rng.integers(r + 1, h - r - 1)), r=r)
        if all(_gap(s.box, o.box) >= 2 for o in shapes):
            shapes.append(s)
    if len(shapes) < world.min_shapes:  # cannot happen for sizes >= 32 and <= 4 shapes; keep the contract
        raise RuntimeError(f"synthetic: could not place {world.min_shapes} shapes in {(h, w)}")
    return Scene(key=f"shapes-{world.seed}-{int(index)}", height=h, width=w, background=background,
                 shapes=tuple(shapes))


def _gap(a, b) -> int:
    """Chebyshev gap in pixels between two inclusive boxes (negative when they overlap)."""
    dx = max(a[0] - b[2], b[0] - a[2]) - 1
    dy = max(a[1] - b[3], b[1] - a[3]) - 1
    return max(dx, dy)


def shape_mask(s: Shape, height: int, width: int) -> np.ndarray:
    """Boolean [H, W] mask of one shape (no anti-aliasing)."""
    m = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = s.box
    if s.kind == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif s.kind == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    else:  # triangle, pointing up
        d.polygon([(s.cx, y0), (x0, y1), (x1, y1)], fill=255)
    return np.asarray(m) > 0


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(image uint8 [H,W,3], target colour map uint8 [H,W,3], instance masks) of a scene."""
    image = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    masks = [shape_mask(s, scene.height, scene.width) for s in scene.shapes]
    for s, m in zip(scene.shapes, masks):
        image[m] = COLOURS[s.colour]
    target = render.render_instances(masks, scene.key, scene.height, scene.width)
    return image, target, masks


# ---- language about a scene (every answer is a function of the scene description) ----

def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    shapes = sorted(scene.shapes, key=lambda s: (s.cx, s.cy))
    names = [f"{_article(s.name)} {s.name}" for s in shapes]
    return f"{_join(names).capitalize()} on a {scene.background} background."


def answer_count(scene: Scene, kind: str | None = None) -> int:
    return sum(1 for s in scene.shapes if kind is None or s.kind == kind)


def answer_exists(scene: Scene, colour: str, kind: str) -> bool:
    return any(s.colour == colour and s.kind == kind for s in scene.shapes)


def answer_colour(scene: Scene, kind: str) -> str:
    """The colour of the only shape of ``kind`` (the question is asked only when there is exactly one)."""
    (s,) = [s for s in scene.shapes if s.kind == kind]
    return s.colour


def answer_relation(a: Shape, b: Shape, relation: str) -> bool | None:
    """Whether ``a`` is ``relation`` ("left of" | "right of" | "above" | "below") ``b``; None if ambiguous
    (their extents overlap along that axis)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    if relation in ("left of", "right of"):
        if not (ax1 < bx0 or bx1 < ax0):
            return None
        return (ax1 < bx0) if relation == "left of" else (bx1 < ax0)
    if relation in ("above", "below"):
        if not (ay1 < by0 or by1 < ay0):
            return None
        return (ay1 < by0) if relation == "above" else (by1 < ay0)
    raise ValueError(f"unknown relation {relation!r}")


SIZE_RATIO = 1.5  # relative-size questions need this area ratio between the two shapes


def shape_area(s: Shape, height: int, width: int) -> int:
    """Pixels of ``s`` as rendered (the instance mask's area)."""
    return int(shape_mask(s, height, width).sum())


def answer_size(scene: Scene, a: Shape, b: Shape, relation: str) -> bool | None:
    """Whether ``a`` is ``relation`` ("bigger" | "smaller") than ``b`` by area; None if the areas are within
    ``SIZE_RATIO`` of each other (ambiguous to the eye)."""
    area_a, area_b = shape_area(a, scene.height, scene.width), shape_area(b, scene.height, scene.width)
    if max(area_a, area_b) < SIZE_RATIO * min(area_a, area_b):
        return None
    if relation not in ("bigger", "smaller"):
        raise ValueError(f"unknown size relation {relation!r}")
    return (area_a > area_b) if relation == "bigger" else (area_a < area_b)


def _yes(b: bool) -> str:
    return "Yes." if b else "No."


def questions(scene: Scene, rng: np.random.Generator, size_questions: bool = False) -> list[tuple[str, str, str]]:
    """All candidate (kind_of_question, question, answer) triples for a scene."""
    qs: list[tuple[str, str, str]] = []
    n = answer_count(scene)
    qs.append(("count", "How many shapes are in the image?", f"{NUMBER_WORDS[n].capitalize()}."))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    k = answer_count(scene, kind)
    qs.append(("count", f"How many {kind}s are there?", f"{NUMBER_WORDS[k].capitalize()}."))
    for kind in SHAPES:
        if answer_count(scene, kind) == 1:
            qs.append(("colour", f"What colour is the {kind}?", f"It is {answer_colour(scene, kind)}."))
    # existence: half the time a shape that is there, half the time a random description
    if rng.random() < 0.5:
        s = scene.shapes[int(rng.integers(len(scene.shapes)))]
        colour, kind = s.colour, s.kind
    else:
        colour, kind = list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
    qs.append(("exists", f"Is there {_article(colour)} {colour} {kind} in the image?", _yes(answer_exists(scene, colour, kind))))
    unique = [s for s in scene.shapes if sum(o.name == s.name for o in scene.shapes) == 1]
    for a in unique:
        for b in unique:
            if a is b:
                continue
            for rel in ("left of", "right of", "above", "below"):
                ans = answer_relation(a, b, rel)
                if ans is not None:
                    q = f"Is the {a.name} {rel} the {b.name}?" if rel in ("above", "below") else \
                        f"Is the {a.name} to the {rel} the {b.name}?"
                    qs.append(("position", q, _yes(ans)))
            if size_questions:
                for rel in ("bigger", "smaller"):
                    ans = answer_size(scene, a, b, rel)
                    if ans is not None:
                        qs.append(("size", f"Is the {a.name} {rel} than the {b.name}?", _yes(ans)))
    qs.append(("caption", "Describe the image.", caption(scene)))
    return qs


def conversation(scene: Scene, world: WorldConfig, index: int) -> list[dict]:
    """LLaVA-style turns: ``qa_per_sample`` distinct questions, the first human turn carries ``<image>``."""
    rng = np.random.default_rng([world.seed, int(index), 0xC0A])
    cands = questions(scene, rng, world.size_questions)
    # Each question kind (count, colour, exists, position, [size,] caption) is equally likely, however many
    # candidates it has (there are many more position questions than the others).
    per_kind = {}
    for c in cands:
        per_kind[c[0]] = per_kind.get(c[0], 0) + 1
    p = np.asarray([1.0 / per_kind[c[0]] for c in cands])
    pick = rng.choice(len(cands), size=min(world.qa_per_sample, len(cands)), replace=False, p=p / p.sum())
    turns = []
    for j, ci in enumerate(sorted(int(p) for p in pick)):
        _, q, a = cands[ci]
        turns.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + q})
        turns.append({"from": "gpt", "value": a})
    return turns


def seg_sample(world: WorldConfig, index: int) -> dict:
    """The segmentation sample (records.py) of ``index``."""
    scene = make_scene(world, index)
    image, target, _ = render_scene(scene)
    return {"task": "seg", "key": scene.key, "source": "synthetic", "image": image, "target": target}


def vqa_sample(world: WorldConfig, index: int) -> dict:
    """The VQA sample (records.py) of ``index``: the same scene as ``seg_sample(world, index)``."""
    scene = make_scene(world, index)
    image, _, _ = render_scene(scene)
    return {"task": "vqa", "key": scene.key, "source": "synthetic", "images": [image],
            "turns": conversation(scene, world, index)}


def vocabulary(world: WorldConfig | None = None) -> list[str]:
    """Every word the synthetic world can produce (for the tiny tokenizer); lower-cased, no punctuation."""
    words = set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBER_WORDS)
    for name in list(COLOURS) + list(BACKGROUNDS):
        words.update(name.split())
    words.update("how many shapes are in the image there what colour is it a an on background and yes no "
                 "left right of to above below describe bigger smaller than".split())
    return sorted(words)
