"""A detector for the synthetic shapes world (sgt_jax/data/synthetic.py) and a GenEval-style score from it.

The world draws flat shapes in a fixed palette on a flat background, so a generated image can be read
without a learned detector:

1. every pixel takes the nearest colour of the palette (shape colours + backgrounds) in RGB; pixels farther
   than ``max_colour_dist`` from every palette colour are left unassigned (blends, noise);
2. each shape colour's pixels are split into 8-connected components; components smaller than ``min_area``
   pixels are dropped;
3. a component's kind comes from its fill ratio (area / bounding-box area): a square fills ~1, a disc
   pi/4 ~ 0.785, an upward triangle ~0.5 (thresholds ``square_fill`` and ``circle_fill``).

It is validated on real renders of the world (tests/unit/test_toy_eval.py: every shape of 150 held-out
scenes per size set found with the right colour and kind, and nothing else). On generated images it is only as good as
the images are clean: a blurry or blended shape may be missed or misread, which the score then counts as a
generation error.

``geneval_score(detections, expected)`` gives GenEval's kinds of checks for a prompt that names shapes in
left-to-right order (the world's captions): ``present`` (every named shape found), ``count`` (as many shapes
as named), ``colour`` (every named kind found in its named colour), ``position`` (the named shapes appear
left to right in the named order; prompts with one shape pass), and ``overall`` (all four).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from sgt_jax.data import synthetic


@dataclasses.dataclass(frozen=True)
class Detection:
    colour: str
    kind: str
    cx: float  # bounding-box centre
    cy: float
    area: int
    box: tuple[int, int, int, int]  # inclusive (x0, y0, x1, y1)


@dataclasses.dataclass(frozen=True)
class DetectorParams:
    max_colour_dist: float = 70.0
    min_area: int = 12
    square_fill: float = 0.9  # fill >= this: square
    circle_fill: float = 0.64  # circle_fill <= fill < square_fill: circle; below: triangle


def _palette():
    names = list(synthetic.COLOURS) + [f"bg:{b}" for b in synthetic.BACKGROUNDS]
    rgb = np.asarray(list(synthetic.COLOURS.values()) + list(synthetic.BACKGROUNDS.values()), np.float32)
    return names, rgb


def classify_pixels(image: np.ndarray, params: DetectorParams = DetectorParams()) -> np.ndarray:
    """int [H, W]: index into ``synthetic.COLOURS`` of each pixel's shape colour, -1 for background or
    unassigned pixels."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"detector input must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    names, rgb = _palette()
    d = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - rgb[None, None], axis=-1)
    idx = d.argmin(-1)
    ok = d.min(-1) <= params.max_colour_dist
    n_shape = len(synthetic.COLOURS)
    return np.where(ok & (idx < n_shape), idx, -1)


def kind_of(mask: np.ndarray, params: DetectorParams = DetectorParams()) -> str:
    ys, xs = np.nonzero(mask)
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box_area
    if fill >= params.square_fill:
        return "square"
    return "circle" if fill >= params.circle_fill else "triangle"


def detect(image: np.ndarray, params: DetectorParams = DetectorParams()) -> list[Detection]:
    """The shapes in ``image``, left to right (by centre x)."""
    labels = classify_pixels(image, params)
    colours = list(synthetic.COLOURS)
    out = []
    for ci, colour in enumerate(colours):
        comp, n = ndimage.label(labels == ci, structure=np.ones((3, 3), bool))
        for j in range(1, n + 1):
            m = comp == j
            area = int(m.sum())
            if area < params.min_area:
                continue
            ys, xs = np.nonzero(m)
            # centre of the bounding box (a triangle's centroid lies below its box centre)
            out.append(Detection(colour, kind_of(m, params), (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, area,
                                 (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
    return sorted(out, key=lambda d: (d.cx, d.cy))


def expected_of(scene: synthetic.Scene) -> list[tuple[str, str]]:
    """(colour, kind) of the scene's shapes in caption order (left to right), as its caption names them."""
    return [(s.colour, s.kind) for s in sorted(scene.shapes, key=lambda s: (s.cx, s.cy))]


def geneval_score(detections: list[Detection], expected: list[tuple[str, str]]) -> dict[str, bool]:
    """GenEval-style binary checks of one generated image against the (colour, kind) list of its prompt."""
    found = [(d.colour, d.kind) for d in detections]
    pool = list(found)
    present = True
    for e in expected:
        if e in pool:
            pool.remove(e)
        else:
            present = False
    count = len(found) == len(expected)
    colour = all(any(d.kind == k and d.colour == c for d in detections) for c, k in expected)
    # order: greedily match the named shapes to detections (left to right) and require increasing x
    xs, used, position = [], set(), True
    for c, k in expected:
        cand = [i for i, d in enumerate(detections) if (d.colour, d.kind) == (c, k) and i not in used]
        if not cand:
            position = False
            break
        used.add(cand[0])
        xs.append(detections[cand[0]].cx)
    if position and len(xs) > 1:
        position = all(a < b for a, b in zip(xs, xs[1:]))
    return dict(present=present, count=count, colour=colour, position=position,
                overall=present and count and colour and position)


def match_scene(detections: list[Detection], scene: synthetic.Scene, max_centre_dist: float = 3.0) -> dict:
    """Detector validation against a rendered scene: shapes found with the right colour and kind within
    ``max_centre_dist`` pixels of their true centre, and detections that match nothing."""
    pool = list(detections)
    hits = 0
    for s in scene.shapes:
        best = None
        for d in pool:
            if d.colour == s.colour and d.kind == s.kind and np.hypot(d.cx - s.cx, d.cy - s.cy) <= max_centre_dist:
                best = d
                break
        if best is not None:
            pool.remove(best)
            hits += 1
    return dict(n_true=len(scene.shapes), hits=hits, false_positives=len(pool))
