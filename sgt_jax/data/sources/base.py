"""The Source protocol every data source implements (Grain-compatible random access + decode).

    src = SamSgtFolderSource(...)
    len(src)                    # number of records (after the optional seeded subset)
    raw = src[i]                # cheap, picklable raw record; NEVER raises for bad data (missing file -> None)
    sample = src.decode(raw)    # records.py sample dict, or raises records.BadSample(reason, detail)
    canon = src.canonical(raw)  # the canonical raw record (sources/common.py) that --mode prepare stores

``grain.MapDataset.source(src).map(src.decode)`` is the intended use (the pipeline wraps decode with
``bad_data.SkipCounter`` so bad samples are counted and skipped).
"""

from __future__ import annotations

import abc

import numpy as np

from sgt_jax.data.proxy_tasks import task_of
from sgt_jax.data.sources.common import check_mask_policy, decode_canonical


class Source(abc.ABC):
    """Base class: subclasses implement ``_num_items``, ``_get(j)`` (and ``canonical`` if their raw records
    are not canonical already). ``max_samples`` > 0 keeps a seeded random subset (not the first N lines,
    song2yu/SGT `BAGEL/data/sam_190k.py`, `BAGEL/data/dataset_info.py`), in ascending index order."""

    name = "source"
    family = "seg"  # "seg" or "vqa"

    def __init__(self, *, proxy_task: str = "segmentation", seed: int = 0, max_samples: int = 0,
                 mask_size_mismatch: str = "skip"):
        task_of(proxy_task)  # validate early, with a message naming the config field
        self.proxy_task = proxy_task
        self.mask_size_mismatch = check_mask_policy(mask_size_mismatch)
        self.seed = int(seed)
        self.max_samples = int(max_samples)
        self._subset: np.ndarray | None = None

    def _finish_init(self) -> None:
        """Call at the end of a subclass ``__init__`` (once ``_num_items`` works) to apply ``max_samples``."""
        n = self._num_items()
        if self.max_samples < 0:
            raise ValueError(f"{self.name}: max_samples must be >= 0, got {self.max_samples}")
        if 0 < self.max_samples < n:
            rng = np.random.default_rng([self.seed, 0x5B5E7])
            self._subset = np.sort(rng.choice(n, size=self.max_samples, replace=False))

    @abc.abstractmethod
    def _num_items(self) -> int:
        """How many records the source holds (before ``max_samples``)."""

    @abc.abstractmethod
    def _get(self, j: int):
        """Record ``j`` (of ``_num_items()``), raw."""

    def __len__(self) -> int:
        return len(self._subset) if self._subset is not None else self._num_items()

    def __getitem__(self, i):
        i = int(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} records")
        i %= n
        return self._get(int(self._subset[i]) if self._subset is not None else i)

    def canonical(self, raw) -> dict:
        return raw

    def decode(self, raw) -> dict:
        return decode_canonical(self.canonical(raw), self.proxy_task if self.family == "seg" else "segmentation",
                                self.seed, self.mask_size_mismatch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, len={len(self)}, proxy_task={self.proxy_task!r})"
