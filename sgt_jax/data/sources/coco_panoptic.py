"""COCO panoptic 2017 from local files: images, panoptic PNGs and the panoptic JSON.

Expected (the official layout; every path may be absolute or relative to ``root``):
  annotations: ``annotations/panoptic_train2017.json`` with ``annotations: [{"image_id", "file_name" (the PNG),
               "segments_info": [{"id", "area", "category_id", "iscrowd", ...}]}]`` and ``images: [{"id",
               "file_name" (the JPEG)}]``;
  image_dir:   ``train2017/`` (the JPEGs);
  mask_dir:    ``annotations/panoptic_train2017/`` (the PNGs; segment id = R + 256 G + 256^2 B).

Target: each listed segment (things and stuff, crowd regions included) is one instance of the shared
rendering rule (sgt_jax/data/render.py; the colour order uses the JSON ``area``); id 0 (void) and ids not
listed in ``segments_info`` are black. The official PNG's own colours are not used.
"""

from __future__ import annotations

import json
import os

import numpy as np

from sgt_jax.data import records, render
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.base import Source
from sgt_jax.data.sources.common import decode_canonical, decode_rgb, encode_png, read_bytes


def _abs(root: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(root, p)


class CocoPanopticSource(Source):
    name = "coco_panoptic"

    def __init__(self, root: str, annotations: str, image_dir: str, mask_dir: str, **kw):
        super().__init__(**kw)
        ann_path = _abs(root, annotations or "annotations/panoptic_train2017.json")
        if not os.path.isfile(ann_path):
            raise FileNotFoundError(f"coco_panoptic: annotations {ann_path!r} (config.data.sources.seg.annotations) "
                                    "does not exist")
        self.image_dir = _abs(root, image_dir or "train2017")
        self.mask_dir = _abs(root, mask_dir or "annotations/panoptic_train2017")
        with open(ann_path, encoding="utf-8") as f:
            doc = json.load(f)
        images = {im["id"]: im["file_name"] for im in doc.get("images", [])}
        # Compact per-record entries: (key, image file, png file, [(segment id, area), ...]).
        self.entries = []
        for a in sorted(doc["annotations"], key=lambda a: a["file_name"]):
            segs = [(int(s["id"]), float(s.get("area", 0))) for s in a.get("segments_info", [])]
            img_file = images.get(a["image_id"], os.path.splitext(a["file_name"])[0] + ".jpg")
            self.entries.append((os.path.splitext(a["file_name"])[0], img_file, a["file_name"], segs))
        del doc
        if not self.entries:
            raise ValueError(f"coco_panoptic: {ann_path!r} has no annotations")
        self._finish_init()

    def _num_items(self) -> int:
        return len(self.entries)

    def _get(self, j: int) -> dict:
        key, img_file, png_file, segs = self.entries[j]
        return {"key": key, "image": read_bytes(os.path.join(self.image_dir, img_file)),
                "panoptic": read_bytes(os.path.join(self.mask_dir, png_file)), "segments": segs}

    def _target(self, raw: dict, hw: tuple[int, int]) -> np.ndarray:
        key = raw["key"]
        pan = decode_rgb(raw["panoptic"], "panoptic png", key, missing_reason="missing_mask").astype(np.int64)
        if pan.shape[:2] != hw:
            raise BadSample("size_mismatch", f"{key}: image {hw} vs panoptic png {pan.shape[:2]}")
        ids = pan[..., 0] + 256 * pan[..., 1] + 256 * 256 * pan[..., 2]
        segs = raw["segments"]
        return render.render_id_map(ids, [s for s, _ in segs], [a for _, a in segs], key)

    def decode(self, raw: dict) -> dict:
        key = raw["key"]
        if self.proxy_task != "segmentation":
            return decode_canonical({"task": "seg", "key": key, "source": self.name, "image": raw["image"]},
                                    self.proxy_task, self.seed)
        image = decode_rgb(raw["image"], "image", key)
        target = self._target(raw, image.shape[:2])
        return records.validate({"task": "seg", "key": key, "source": self.name, "image": image, "target": target})

    def canonical(self, raw: dict) -> dict:
        image = decode_rgb(raw["image"], "image", raw["key"])
        target = self._target(raw, image.shape[:2])
        return {"task": "seg", "key": raw["key"], "source": self.name, "image": raw["image"],
                "target": encode_png(target)}
