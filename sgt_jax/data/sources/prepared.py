"""Reads the ArrayRecord shards written by ``--mode prepare`` (sgt_jax/data/arrayrecord_io.py).

Random access through ``grain.sources.ArrayRecordDataSource`` (one global index over all shards), records
decoded with the shared canonical decode, so a prepared SAM/SA-1B/COCO sample equals the one decoded from
the raw files. The proxy task is applied at read time: prepared shards hold the segmentation targets and
serve every proxy.
"""

from __future__ import annotations

from grain.sources import ArrayRecordDataSource

from sgt_jax.data.arrayrecord_io import find_shards, unpack_record
from sgt_jax.data.sources.base import Source


class PreparedSource(Source):
    def __init__(self, root: str, family: str, **kw):
        if family not in ("seg", "vqa"):
            raise ValueError(f"prepared: family must be 'seg' or 'vqa', got {family!r}")
        super().__init__(**kw)
        self.family = family
        self.name = f"prepared_{family}"
        self.shards = find_shards(root, family)
        self._ds = ArrayRecordDataSource(self.shards)
        self._finish_init()

    def _num_items(self) -> int:
        return len(self._ds)

    def _get(self, j: int) -> bytes:
        return self._ds[j]

    def canonical(self, raw: bytes) -> dict:
        return unpack_record(raw)
