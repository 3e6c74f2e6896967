"""COCO panoptic 2017 from local files: images, panoptic PNGs and the panoptic JSON.

Expected (the official layout; every path may be absolute or relative to ``root``):
  annotations: ``annotations/panoptic_train2017.json`` with ``annotations: [{"image_id", "file_name" (the PNG),
               "segments_info": [{"id", "area", "category_id", "iscrowd", ...}]}]`` and ``images: [{"id",
               "file_name" (the JPEG)}]``;
  image_dir:   ``train2017/`` (the JPEGs);
  mask_dir:    ``panoptic_train2017/`` (the PNGs; segment id = R + 256 G + 256^2 B). Unzipping the official
               ``panoptic_train2017.zip`` where it lies gives ``annotations/panoptic_train2017/`` instead: when
               ``mask_dir`` is empty, the first of the two that exists is used.

Target: each listed segment (things and stuff, crowd regions included) is one instance of the shared
rendering rule (sgt_jax/data/render.py; the colour order uses the JSON ``area``); id 0 (void) and ids not
listed in ``segments_info`` are black. The official PNG's own colours are not used. A record whose
``segments_info`` is empty is skipped (``empty_annotations``: its target would be all black).
"""

from __future__ import annotations

import os

import numpy as np

from sgt_jax.data import records, render
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.base import Source
from sgt_jax.data.sources.common import decode_canonical, decode_rgb, encode_png, fit_mask, load_json, read_bytes


def _abs(root: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(root, p)


MASK_DIRS = ("panoptic_train2017", "annotations/panoptic_train2017")


class CocoPanopticSource(Source):
    name = "coco_panoptic"

    def __init__(self, root: str, annotations: str, image_dir: str, mask_dir: str, **kw):
        super().__init__(**kw)
        ann_path = _abs(root, annotations or "annotations/panoptic_train2017.json")
        if not os.path.isfile(ann_path):
            raise FileNotFoundError(f"coco_panoptic: annotations {ann_path!r} (config.data.sources.seg.annotations) "
                                    "does not exist")
        self.image_dir = _abs(root, image_dir or "train2017")
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"coco_panoptic: image folder {self.image_dir!r} "
                                    "(config.data.sources.seg.image_dir) does not exist")
        tried = [_abs(root, mask_dir)] if mask_dir else [_abs(root, d) for d in MASK_DIRS]
        self.mask_dir = next((d for d in tried if os.path.isdir(d)), None)
        if self.mask_dir is None:
            raise FileNotFoundError(f"coco_panoptic: no panoptic PNG folder: {' or '.join(map(repr, tried))} "
                                    "(config.data.sources.seg.mask_dir) does not exist")
        doc = load_json(ann_path, "coco_panoptic")
        try:
            images = {im["id"]: im["file_name"] for im in doc.get("images", [])}
            # Compact per-record entries: (key, image file, png file, [(segment id, area), ...]).
            self.entries = []
            for a in sorted(doc["annotations"], key=lambda a: a["file_name"]):
                segs = [(int(s["id"]), float(s.get("area", 0))) for s in a.get("segments_info", [])]
                img_file = images.get(a["image_id"], os.path.splitext(a["file_name"])[0] + ".jpg")
                self.entries.append((os.path.splitext(a["file_name"])[0], img_file, a["file_name"], segs))
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"coco_panoptic: {ann_path}: not a COCO panoptic annotation file "
                             f"({type(err).__name__}: {err})") from None
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
        segs = raw["segments"]
        if not segs:
            raise BadSample("empty_annotations", f"{key}: segments_info is empty")
        pan = decode_rgb(raw["panoptic"], "panoptic png", key, missing_reason="missing_mask")
        pan = fit_mask(pan, hw, key, self.mask_size_mismatch, "panoptic png").astype(np.int64)
        ids = pan[..., 0] + 256 * pan[..., 1] + 256 * 256 * pan[..., 2]
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
