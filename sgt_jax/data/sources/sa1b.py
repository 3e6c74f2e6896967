"""Raw SA-1B: ``sa_<id>.jpg`` + ``sa_<id>.json`` pairs (as the SA-1B tar files extract), anywhere under root.

The JSON is SA-1B's: ``{"image": {"height", "width", ...}, "annotations": [{"segmentation": {"size": [h, w],
"counts": <COCO RLE>}, ...}, ...]}``. The target is rendered with the shared rule of sgt_jax/data/render.py
(descending area, key-seeded distinct saturated colours, black where no mask). Areas come from the RLEs
themselves (``pycocotools.mask.area``), not from the JSON's ``area`` field. Masks are decoded one at a time
and painted into a rank map, so memory stays O(H*W) however many masks an image has.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from sgt_jax.data import records, render
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.base import Source
from sgt_jax.data.sources.common import decode_canonical, decode_rgb, encode_png, read_bytes
from sgt_jax.extras import require


def _rles(ann_bytes: bytes | None, key: str) -> list[dict]:
    if ann_bytes is None:
        raise BadSample("missing_mask", f"{key}: annotation JSON not found")
    mask_utils = require("pycocotools.mask", "data")
    try:
        doc = json.loads(ann_bytes)
        anns = doc["annotations"]
        rles = []
        for a in anns:
            seg = a["segmentation"]
            h, w = (int(v) for v in seg["size"])
            counts = seg["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                seg = mask_utils.frPyObjects(seg, h, w)
            elif isinstance(counts, str):
                seg = {"size": [h, w], "counts": counts.encode("ascii")}
            else:
                raise TypeError(f"RLE counts must be str or list, got {type(counts).__name__}")
            rles.append(seg)
    except (ValueError, KeyError, TypeError, UnicodeEncodeError) as err:
        raise BadSample("bad_annotation", f"{key}: {type(err).__name__}: {err}") from None
    return rles


def render_rles(rles: list[dict], key: str, height: int, width: int) -> np.ndarray:
    """COCO RLEs -> uint8 [H, W, 3] instance colour map (render.py rule). Raises BadSample on size/RLE errors."""
    for i, r in enumerate(rles):
        if tuple(int(v) for v in r["size"]) != (height, width):
            raise BadSample("size_mismatch", f"{key}: annotation {i} is {tuple(r['size'])}, image {(height, width)}")
    if not rles:
        return np.zeros((height, width, 3), np.uint8)
    mask_utils = require("pycocotools.mask", "data")
    try:
        areas = mask_utils.area(rles)
        boxes = mask_utils.toBbox(rles)  # painting only inside each mask's box is ~15x cheaper than full-frame
        order = render.paint_order(areas)
        ranks = np.full((height, width), -1, dtype=np.int32)
        for rank, idx in enumerate(order):
            x, y, w, h = (int(v) for v in boxes[idx])
            box = (slice(y, y + h), slice(x, x + w))
            ranks[box][mask_utils.decode(rles[idx])[box] > 0] = rank
    except Exception as err:  # pycocotools raises plain Exceptions for corrupt RLE strings
        raise BadSample("bad_annotation", f"{key}: RLE decode failed: {err}") from None
    colours = np.concatenate([render.palette(key, len(rles)), np.zeros((1, 3), np.uint8)])
    return colours[ranks]  # rank -1 indexes the trailing black row


class Sa1bSource(Source):
    """Every ``*.jpg`` under ``root`` with its same-stem ``.json`` beside it (missing JSON -> missing_mask)."""

    name = "sa1b"

    def __init__(self, root: str, **kw):
        super().__init__(**kw)
        self.images = sorted(glob.glob(os.path.join(root, "**", "*.jpg"), recursive=True))
        if not self.images:
            raise FileNotFoundError(f"sa1b: no *.jpg under {root!r} (config.data.sources.seg.root)")
        self._finish_init()

    def _num_items(self) -> int:
        return len(self.images)

    def _get(self, j: int) -> dict:
        path = self.images[j]
        stem = os.path.splitext(path)[0]
        return {"key": os.path.basename(stem), "image": read_bytes(path), "annotation": read_bytes(stem + ".json")}

    def decode(self, raw: dict) -> dict:
        key = raw["key"]
        if self.proxy_task != "segmentation":  # the other proxies need only the image: skip the RLEs
            return decode_canonical({"task": "seg", "key": key, "source": self.name, "image": raw["image"]},
                                    self.proxy_task, self.seed)
        image = decode_rgb(raw["image"], "image", key)
        target = render_rles(_rles(raw["annotation"], key), key, image.shape[0], image.shape[1])
        return records.validate({"task": "seg", "key": key, "source": self.name, "image": image, "target": target})

    def canonical(self, raw: dict) -> dict:
        """Keeps the original JPEG bytes; renders the target once and stores it as PNG."""
        key = raw["key"]
        image = decode_rgb(raw["image"], "image", key)
        target = render_rles(_rles(raw["annotation"], key), key, image.shape[0], image.shape[1])
        return {"task": "seg", "key": key, "source": self.name, "image": raw["image"], "target": encode_png(target)}
