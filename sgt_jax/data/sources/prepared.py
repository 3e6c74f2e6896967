"""Reads the ArrayRecord shards written by ``--mode prepare`` (sgt_jax/data/arrayrecord_io.py).

Random access over all shards with one global index (``array_record`` readers opened lazily, one set per
process, so the source pickles cheaply into Grain workers and does not import Grain itself), records decoded with the shared canonical decode, so a prepared SAM/SA-1B/COCO sample equals the one decoded from
the raw files. The proxy task is applied at read time: prepared shards hold the segmentation targets and
serve every proxy.
"""

from __future__ import annotations

import bisect
import os

from array_record.python.array_record_module import ArrayRecordReader

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
        self._starts = [0]  # global index of each shard's first record, then the total
        for path in self.shards:
            r = ArrayRecordReader(path)
            self._starts.append(self._starts[-1] + r.num_records())
            r.close()
        self._readers: dict[int, ArrayRecordReader] = {}
        self._pid = None
        self._finish_init()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_readers"], d["_pid"] = {}, None  # readers are per process
        return d

    def _num_items(self) -> int:
        return self._starts[-1]

    def _get(self, j: int) -> bytes:
        if self._pid != os.getpid():
            self._readers, self._pid = {}, os.getpid()
        sid = bisect.bisect_right(self._starts, j) - 1
        reader = self._readers.get(sid)
        if reader is None:
            reader = self._readers[sid] = ArrayRecordReader(self.shards[sid], "readahead_buffer_size:0")
        return reader.read([j - self._starts[sid]])[0]

    def canonical(self, raw: bytes) -> dict:
        return unpack_record(raw)
