"""Bad-data accounting: every skipped sample is counted by reason (``records.REASONS``), never silently lost.

Use ``SkipCounter`` wherever samples are decoded (prepare mode, the Grain pipeline):

    counter = SkipCounter()
    sample = counter.call(source.decode, raw)   # None if BadSample was raised, and the reason is counted
    counter.as_dict()                           # {"seen": ..., "ok": ..., "skipped": {reason: n}, "examples": ...}

Only ``BadSample`` is caught: any other exception is a bug in our code and propagates.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable

from sgt_jax.data.records import REASONS, BadSample

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts samples seen, kept and skipped by reason; keeps the first few details of each reason."""

    def __init__(self, max_examples: int = 5, log_skips: bool = True):
        self.seen = 0
        self.ok = 0
        self.skipped: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.max_examples = max_examples
        self.log_skips = log_skips

    def add_ok(self) -> None:
        self.seen += 1
        self.ok += 1

    def add_skip(self, err: BadSample) -> None:
        self.seen += 1
        self.skipped[err.reason] += 1
        if len(self.examples[err.reason]) < self.max_examples:
            self.examples[err.reason].append(err.detail)
            if self.log_skips:
                log.warning("skipping sample (%s): %s", err.reason, err.detail)

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Returns ``fn(*args, **kwargs)``, or None (counted by reason) if it raised ``BadSample``."""
        try:
            out = fn(*args, **kwargs)
        except BadSample as err:
            self.add_skip(err)
            return None
        self.add_ok()
        return out

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "SkipCounter | dict") -> None:
        """Adds another counter (or its ``as_dict()``, e.g. from a worker process) into this one."""
        d = other.as_dict() if isinstance(other, SkipCounter) else other
        self.seen += d["seen"]
        self.ok += d["ok"]
        for reason, n in d["skipped"].items():
            self.skipped[reason] += n
        for reason, ex in d.get("examples", {}).items():
            room = self.max_examples - len(self.examples[reason])
            self.examples[reason].extend(ex[: max(room, 0)])

    def as_dict(self) -> dict:
        """JSON-serialisable counts; ``skipped`` lists every known reason (0 when none) in a fixed order."""
        skipped = {r: int(self.skipped.get(r, 0)) for r in REASONS}
        return {"seen": self.seen, "ok": self.ok, "skipped": skipped,
                "examples": {r: list(v) for r, v in self.examples.items() if v}}
