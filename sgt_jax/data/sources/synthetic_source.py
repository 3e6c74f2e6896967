"""Sources over the synthetic shapes world (sgt_jax/data/synthetic.py): raw record = the index, decode renders.

Segmentation and VQA sources of the same world and index show the same scene.
"""

from __future__ import annotations

from sgt_jax.data import proxy_tasks, records, synthetic
from sgt_jax.data.sources.base import Source
from sgt_jax.data.sources.common import encode_png


class _SyntheticBase(Source):
    name = "synthetic"

    def __init__(self, world: synthetic.WorldConfig, **kw):
        kw.setdefault("seed", world.seed)
        super().__init__(**kw)
        self.world = world
        self._finish_init()

    def _num_items(self) -> int:
        return self.world.num_samples

    def _get(self, j: int) -> dict:
        return {"index": j}


class SyntheticSegSource(_SyntheticBase):
    family = "seg"

    def decode(self, raw: dict) -> dict:
        s = synthetic.seg_sample(self.world, raw["index"])
        if self.proxy_task != "segmentation":
            s = proxy_tasks.make_proxy_sample(s["image"], s["key"], s["source"], self.proxy_task, self.seed)
        return records.validate(s)

    def canonical(self, raw: dict) -> dict:
        s = synthetic.seg_sample(self.world, raw["index"])
        return {"task": "seg", "key": s["key"], "source": s["source"], "image": encode_png(s["image"]),
                "target": encode_png(s["target"])}


class SyntheticVqaSource(_SyntheticBase):
    family = "vqa"

    def decode(self, raw: dict) -> dict:
        return records.validate(synthetic.vqa_sample(self.world, raw["index"]))

    def canonical(self, raw: dict) -> dict:
        s = synthetic.vqa_sample(self.world, raw["index"])
        return {"task": "vqa", "key": s["key"], "source": s["source"], "images": [encode_png(i) for i in s["images"]],
                "turns": s["turns"]}
