"""TFDS datasets in array_record format as sources (``kind="tfds"``), read with ``tfds.data_source``
(random access, no TensorFlow). The dataset must have the features of ``sgt_shapes`` (data/shapes_tfds.py):
``key``, ``image``, ``target`` (seg family) and ``question``/``answer`` (vqa family: one QA pair about the
image). Build it first, e.g. ``data.shapes_tfds.build(data_dir, "default")``; the builder module need not be
imported to read it (TFDS reads the dataset info from ``root``/``name``).
"""

from __future__ import annotations

import numpy as np

from sgt_jax.data import proxy_tasks, records
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.base import Source

SEG_FEATURES = ("key", "image", "target")
VQA_FEATURES = ("key", "image", "question", "answer")


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class TfdsSource(Source):
    def __init__(self, root: str, name: str, split: str, family: str, **kw):
        import tensorflow_datasets as tfds  # imported only for this kind (slow import)

        if family not in ("seg", "vqa"):
            raise ValueError(f"tfds: family must be 'seg' or 'vqa', got {family!r}")
        if not name:
            raise ValueError(f"tfds: config.data.sources.{family}.tfds_name is empty (e.g. 'sgt_shapes/default')")
        super().__init__(**kw)
        self.family, self.name = family, f"tfds:{name}"
        self._args = (name, root, split)
        self._ds = tfds.data_source(name, data_dir=root or None, split=split)
        need = SEG_FEATURES if family == "seg" else VQA_FEATURES
        have = set(self._ds.dataset_info.features.keys())
        if not set(need) <= have:
            raise ValueError(f"tfds: {name} has features {sorted(have)}; the {family} family needs {need}")
        self._finish_init()

    def __getstate__(self):  # the TFDS data source is reopened in each worker
        d = dict(self.__dict__)
        d["_ds"] = None
        return d

    def __setstate__(self, d):
        import tensorflow_datasets as tfds

        self.__dict__.update(d)
        name, root, split = self._args
        self._ds = tfds.data_source(name, data_dir=root or None, split=split)

    def _num_items(self) -> int:
        return len(self._ds)

    def _get(self, j: int) -> dict:
        return self._ds[j]  # decoded by TFDS: numpy images, bytes texts

    def decode(self, raw: dict) -> dict:
        key = _text(raw.get("key", b"")) or "?"
        image = np.asarray(raw["image"], dtype=np.uint8)
        if self.family == "vqa":
            turns = [{"from": "human", "value": "<image>\n" + _text(raw["question"])},
                     {"from": "gpt", "value": _text(raw["answer"])}]
            return records.validate({"task": "vqa", "key": key, "source": self.name, "images": [image],
                                     "turns": turns})
        if self.proxy_task != "segmentation":
            return records.validate(proxy_tasks.make_proxy_sample(image, key, self.name, self.proxy_task, self.seed))
        target = raw.get("target")
        if target is None:
            raise BadSample("missing_mask", f"{key}: no target in the TFDS record")
        return records.validate({"task": "seg", "key": key, "source": self.name, "image": image,
                                 "target": np.asarray(target, dtype=np.uint8)})

    def canonical(self, raw: dict) -> dict:
        """PNG-encoded canonical record (what --mode prepare stores)."""
        from sgt_jax.data.sources.common import encode_png

        key = _text(raw.get("key", b"")) or "?"
        if self.family == "vqa":
            s = self.decode(raw)
            return {"task": "vqa", "key": key, "source": self.name, "images": [encode_png(i) for i in s["images"]],
                    "turns": s["turns"]}
        target = raw.get("target")
        return {"task": "seg", "key": key, "source": self.name, "image": encode_png(np.asarray(raw["image"], np.uint8)),
                "target": None if target is None else encode_png(np.asarray(target, dtype=np.uint8))}
