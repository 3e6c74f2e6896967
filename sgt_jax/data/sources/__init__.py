"""Data sources: raw data on disk (or the synthetic world) -> Grain random access + decode to records.py dicts.

Entry points used by the pipeline (sgt_jax/data/pipeline.py) and ``--mode prepare``:

    seg_src = build_seg_source(config)        # config.data.sources.seg + config.data.proxy_task
    vqa_src = build_vqa_source(config)        # config.data.sources.vqa; None when kind == "none"

Each is a ``base.Source``: ``len(src)``, ``src[i]`` (raw record, never raises on bad data),
``src.decode(raw)`` (sample dict, or raises records.BadSample). Formats on disk: docs/data_sources.md.
"""

from __future__ import annotations

from sgt_jax.data import synthetic
from sgt_jax.data.proxy_tasks import task_of
from sgt_jax.data.sources.base import Source
from sgt_jax.data.sources.coco_panoptic import CocoPanopticSource
from sgt_jax.data.sources.llava_vqa import LlavaVqaSource
from sgt_jax.data.sources.prepared import PreparedSource
from sgt_jax.data.sources.sa1b import Sa1bSource
from sgt_jax.data.sources.sam_sgt import SamSgtFolderSource, SamSgtTarSource
from sgt_jax.data.sources.synthetic_source import SyntheticSegSource, SyntheticVqaSource
from sgt_jax.data.sources.tfds_source import TfdsSource

SEG_KINDS = ("synthetic", "sam_sgt", "sam_sgt_tar", "sa1b", "coco_panoptic", "prepared", "tfds")
VQA_KINDS = ("synthetic", "llava", "prepared", "tfds", "none")

__all__ = ["Source", "build_seg_source", "build_vqa_source", "SEG_KINDS", "VQA_KINDS", "SamSgtFolderSource",
           "SamSgtTarSource", "Sa1bSource", "CocoPanopticSource", "LlavaVqaSource", "PreparedSource",
           "SyntheticSegSource", "SyntheticVqaSource", "TfdsSource"]


def _common(config, section) -> dict:
    return dict(proxy_task=config.data.proxy_task, seed=int(config.data.seed),
                max_samples=int(section.max_samples), mask_size_mismatch=str(config.data.mask_size_mismatch))


def build_seg_source(config, root_override: str | None = None) -> Source:
    """The segmentation-family source of ``config`` (``root_override`` replaces ``sources.seg.root``)."""
    s = config.data.sources.seg
    task_of(config.data.proxy_task)
    kind, root = s.kind, root_override if root_override is not None else s.root
    kw = _common(config, s)
    if kind == "synthetic":
        kw.pop("seed")
        return SyntheticSegSource(synthetic.WorldConfig.from_config(config.data.sources.synthetic), **kw)
    if kind == "sam_sgt":
        return SamSgtFolderSource(root, s.list_file, **kw)
    if kind == "sam_sgt_tar":
        return SamSgtTarSource(root, **kw)
    if kind == "sa1b":
        return Sa1bSource(root, **kw)
    if kind == "coco_panoptic":
        return CocoPanopticSource(root, s.annotations, s.image_dir, s.mask_dir, **kw)
    if kind == "prepared":
        return PreparedSource(root, "seg", **kw)
    if kind == "tfds":
        return TfdsSource(root, s.tfds_name, s.split, "seg", **kw)
    raise ValueError(f"config.data.sources.seg.kind={kind!r}; choose one of {SEG_KINDS}")


def build_vqa_source(config, root_override: str | None = None) -> Source | None:
    """The VQA source of ``config``, or None for ``kind == "none"``."""
    s = config.data.sources.vqa
    kind, root = s.kind, root_override if root_override is not None else s.root
    kw = _common(config, s)
    if kind == "none":
        return None
    if kind == "synthetic":
        kw.pop("seed")
        return SyntheticVqaSource(synthetic.WorldConfig.from_config(config.data.sources.synthetic), **kw)
    if kind == "llava":
        return LlavaVqaSource(s.annotations, s.image_root, root=root, **kw)
    if kind == "prepared":
        return PreparedSource(root, "vqa", **kw)
    if kind == "tfds":
        return TfdsSource(root, s.tfds_name, s.split, "vqa", **kw)
    raise ValueError(f"config.data.sources.vqa.kind={kind!r}; choose one of {VQA_KINDS}")
