"""The sample contract between data *sources* (decode) and the rest of the data path (transforms, plans, packing).

Every source in ``sgt_jax.data.sources`` decodes its raw records into plain Python dicts of exactly one of
two shapes. Nothing downstream may rely on anything that is not listed here.

Segmentation family (``task`` in ``SEG_TASKS``)::

    {"task":   "seg" | "recon" | "edge" | "inpaint",
     "key":    str,                 # stable, unique id of the sample within its source (e.g. the file stem)
     "source": str,                 # which source made it: "sam_sgt", "sa1b", "coco_panoptic", "synthetic", ...
     "image":  uint8 [H, W, 3],     # the ViT input: RGB (or the *corrupted* RGB for "inpaint")
     "target": uint8 [H, W, 3]}     # the VAE target, SAME H, W as image:
                                    #   seg -> instance colour map, recon -> the RGB, edge -> edge map (white on
                                    #   black), inpaint -> the clean RGB

VQA::

    {"task":   "vqa",
     "key":    str,
     "source": str,
     "images": list of uint8 [H, W, 3]            # may be empty (text-only record)
     "turns":  list of {"from": "human" | "gpt", "value": str}}
                                    # "<image>" markers in the values; their total count == len(images);
                                    # at least one "gpt" turn with non-empty text (else nothing to learn)

Bad data never crashes the pipeline and never passes silently: decoding or validating raises
``BadSample(reason, detail)`` with ``reason`` from ``REASONS``; ``sgt_jax.data.bad_data`` counts them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SEG_TASKS = ("seg", "recon", "edge", "inpaint")
VQA_TASK = "vqa"
TASKS = SEG_TASKS + (VQA_TASK,)
IMAGE_MARKER = "<image>"
ROLES = ("human", "gpt")

# The fixed list of reasons a sample may be skipped for. Add new ones here (and document them in
# docs/data_sources.md), never invent ad-hoc strings at the raise site.
REASONS = (
    "corrupt_image",  # image/mask bytes that no decoder accepts
    "truncated_image",  # image/mask file cut short
    "missing_image",  # an image file named by a record does not exist
    "missing_mask",  # the segmentation target of an image does not exist
    "size_mismatch",  # target H, W != image H, W
    "bad_annotation",  # undecodable annotation (RLE, panoptic segment info, JSON record)
    "empty_annotations",  # a segmentation record that lists no instance at all (its target would be all black)
    "empty_conversation",  # no turns, or no gpt turn with text
    "image_count_mismatch",  # number of "<image>" markers != number of images
    "bad_record",  # structurally malformed record (wrong types, missing keys, unknown task)
    "over_budget",  # (data/plans, data/packing) does not fit the static token/patch/latent budget
    "unknown_special_token",  # (data/tokenizer) text contains a reserved special-token string
)


class BadSample(Exception):
    """A sample that must be skipped. ``reason`` is one of ``REASONS``; ``detail`` says what and where."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"BadSample reason {reason!r} is not one of {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across Grain worker processes
        return (BadSample, (self.reason, self.detail))


def _check_rgb(arr: Any, what: str, key: str) -> tuple[int, int]:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        desc = f"{type(arr).__name__} {getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}"
        raise BadSample("bad_record", f"{key}: {what} must be a uint8 [H,W,3] array, got {desc}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadSample("bad_record", f"{key}: {what} is empty, shape {arr.shape}")
    return arr.shape[0], arr.shape[1]


def validate(sample: Any) -> dict:
    """Checks ``sample`` against the contract above; returns it unchanged, or raises ``BadSample``."""
    if not isinstance(sample, dict):
        raise BadSample("bad_record", f"sample must be a dict, got {type(sample).__name__}")
    task = sample.get("task")
    if task not in TASKS:
        raise BadSample("bad_record", f"task {task!r} is not one of {TASKS}")
    for field in ("key", "source"):
        if not isinstance(sample.get(field), str) or not sample.get(field):
            raise BadSample("bad_record", f"{field!r} must be a non-empty str, got {sample.get(field)!r}")
    key = sample["key"]
    if task in SEG_TASKS:
        missing = {"image", "target"} - sample.keys()
        if missing:
            raise BadSample("missing_mask" if missing == {"target"} else "bad_record", f"{key}: no {missing}")
        hw = _check_rgb(sample["image"], "image", key)
        thw = _check_rgb(sample["target"], "target", key)
        if hw != thw:
            raise BadSample("size_mismatch", f"{key}: image {hw} vs target {thw}")
        return sample
    images, turns = sample.get("images"), sample.get("turns")
    if not isinstance(images, list) or not isinstance(turns, list):
        raise BadSample("bad_record", f"{key}: 'images' and 'turns' must be lists")
    for i, img in enumerate(images):
        _check_rgb(img, f"images[{i}]", key)
    n_markers = 0
    has_answer = False
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise BadSample("bad_record", f"{key}: turn {i} must be {{'from': human|gpt, 'value': str}}, "
                                          f"got {turn!r:.120}")
        n_markers += turn["value"].count(IMAGE_MARKER)
        has_answer |= turn["from"] == "gpt" and bool(turn["value"].strip())
    if not turns or not has_answer:
        raise BadSample("empty_conversation", f"{key}: {len(turns)} turns, no gpt turn with text")
    if n_markers != len(images):
        raise BadSample("image_count_mismatch", f"{key}: {n_markers} {IMAGE_MARKER} markers, {len(images)} images")
    return sample
