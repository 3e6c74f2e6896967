"""Target rendering: instance masks -> one full-frame RGB colour map (the SGT segmentation target).

The released SGT data ships pre-rendered PNGs with no rule (song2yu/SGT `BAGEL/data/sam_190k.py`: the released targets are pre-rendered PNGs). Every target we
render ourselves (SA-1B RLEs, COCO panoptic segments, the synthetic shapes world) follows ONE rule:

1. Instances are painted in **descending area** order (ties: original annotation order), so small instances
   painted later end up on top of large ones that overlap them.
2. The i-th painted instance gets colour ``palette(key, n)[i]``: a list of **distinct, saturated** colours
   derived deterministically from the sample key (a BLAKE2b hash seeds the hue start), so the same image
   always gets the same colours and different images get different ones.
   Colours: hue ``h_i = (h0 + i * 0.6180339887) mod 1`` (golden-ratio steps spread any prefix evenly), with
   (saturation, value) cycling every full hue round through (1.0, 1.0), (0.65, 1.0), (1.0, 0.7), (0.65, 0.7);
   duplicates after 8-bit rounding and colours too close to black are skipped. All colours have S >= 0.65
   and V >= 0.7 (before 8-bit rounding), so none is grey, black or white.
3. Pixels no instance covers are black (0, 0, 0).

Targets are never interpolated: resizing them is nearest-neighbour only (sgt_jax/data/transforms.py).
"""

from __future__ import annotations

import colorsys
import hashlib
from typing import Sequence

import numpy as np

_GOLDEN = 0.6180339887498949
_SV_CYCLE = ((1.0, 1.0), (0.65, 1.0), (1.0, 0.7), (0.65, 0.7))
BACKGROUND = (0, 0, 0)


def key_seed(key: str, salt: str = "") -> int:
    """A stable 64-bit seed from a string (Python's ``hash`` is salted per process, so it is not usable)."""
    return int.from_bytes(hashlib.blake2b(f"{salt}|{key}".encode(), digest_size=8).digest(), "little")


def palette(key: str, n: int) -> np.ndarray:
    """``n`` distinct saturated uint8 RGB colours [n, 3] for the sample ``key`` (deterministic)."""
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    h0 = (key_seed(key, "palette") % 1_000_003) / 1_000_003
    out: list[tuple[int, int, int]] = []
    seen = {BACKGROUND}
    i = 0
    while len(out) < n:
        s, v = _SV_CYCLE[(i // 16) % len(_SV_CYCLE)]
        # Past the 4 (s, v) rounds, nudge the hue start so that later rounds give new colours.
        h = (h0 + i * _GOLDEN + (i // (16 * len(_SV_CYCLE))) * 0.013) % 1.0
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))
        i += 1
        if rgb in seen:
            continue
        seen.add(rgb)
        out.append(rgb)
        if i > 64 * n + 1024:  # cannot happen for n < ~16M colours; guards an infinite loop
            raise RuntimeError(f"palette could not find {n} distinct colours")
    return np.asarray(out, dtype=np.uint8).reshape(n, 3)


def paint_order(areas: Sequence[float]) -> np.ndarray:
    """Indices of instances in painting order: descending area, ties broken by original order (stable)."""
    areas = np.asarray(areas, dtype=np.float64)
    return np.argsort(-areas, kind="stable")


def render_instances(masks: Sequence[np.ndarray] | np.ndarray, key: str, height: int, width: int) -> np.ndarray:
    """Renders boolean instance masks [N, H, W] into the uint8 [H, W, 3] colour map of the module rule."""
    out = np.zeros((height, width, 3), dtype=np.uint8)
    if len(masks) == 0:
        return out
    masks = [np.asarray(m, dtype=bool) for m in masks]
    for i, m in enumerate(masks):
        if m.shape != (height, width):
            raise ValueError(f"mask {i} has shape {m.shape}, expected {(height, width)}")
    order = paint_order([m.sum() for m in masks])
    colours = palette(key, len(masks))
    for rank, idx in enumerate(order):
        out[masks[idx]] = colours[rank]
    return out


def render_id_map(ids: np.ndarray, segment_ids: Sequence[int], areas: Sequence[float], key: str) -> np.ndarray:
    """Renders a non-overlapping segment-id map [H, W] (e.g. COCO panoptic) with the module rule.

    ``segment_ids`` lists the valid segments (others, and id 0, stay black); ``areas`` gives their area for
    the colour order (the same rule as instances, so the same key and areas give the same colours).
    """
    if len(segment_ids) != len(areas):
        raise ValueError(f"{len(segment_ids)} segment ids but {len(areas)} areas")
    out = np.zeros(ids.shape + (3,), dtype=np.uint8)
    if not len(segment_ids):
        return out
    order = paint_order(areas)
    colours = palette(key, len(segment_ids))
    lut_ids = np.asarray(segment_ids, dtype=np.int64)[order]
    # Map each pixel's id to its rank in the paint order via a sorted lookup (vectorised, O(HW log N)).
    sorter = np.argsort(lut_ids)
    sorted_ids = lut_ids[sorter]
    pos = np.searchsorted(sorted_ids, ids.astype(np.int64))
    pos = np.clip(pos, 0, len(sorted_ids) - 1)
    hit = sorted_ids[pos] == ids
    ranks = sorter[pos]
    out[hit] = colours[ranks[hit]]
    return out
