"""OmniGen2's training input: the same sources, Grain streams, skips and resume as BAGEL's pipeline
(sgt_jax/data/pipeline.py), with OmniGen2's plans (sgt_jax/data/omnigen2_plan.py) and one sample per row.

    it = make_train_iterator(config, process_index=..., process_count=...)
    batch = next(it)      # dict of numpy arrays, leading dim data.packs_per_batch // process_count rows
    it.get_state() / it.set_state(state) / it.stats()

The quota is exact per batch: every process's batch holds ``rows * seg / (seg + vqa)`` segmentation rows,
in groups of the quota's pattern ([seg, seg, vqa] for SGT's 2:1, the reference's interleave of
[gen, gen, sft] micro-batches), so micro-batches of rows j, j+K, ... with K a multiple of 3 are single-task. A bad sample (decode, plan, budget) is skipped and counted by reason, and
the stream's next sample takes its place. The state is the two stream positions and the counters: a
restored iterator gives exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import numpy as np

from sgt_jax.data import omnigen2_plan, pipeline
from sgt_jax.data.bad_data import SkipCounter
from sgt_jax.data.mixing import pull_valid
from sgt_jax.data.tokenizer import get_tokenizer

STATE_VERSION = 1
GROUPS = ("seg", "vqa")


class PlanFn(pipeline.PlanStep):
    """OmniGen2's map step (the frame of ``pipeline.PlanStep``): one sample -> one row of
    sgt_jax/data/omnigen2_plan.py."""

    def __init__(self, config, source, group: str, process_index: int, process_count: int, tokenizer=None):
        super().__init__(config, source, group, process_index, process_count, tokenizer)
        self.pc = omnigen2_plan.PlanConfig.from_config(config)

    def plan(self, sample: dict, rng: np.random.Generator) -> dict:
        if self.group == "seg":
            return omnigen2_plan.seg_plan(sample, self.instruction(sample, rng), self.tok, self.pc)
        return omnigen2_plan.vqa_plan(sample, self.tok, self.pc)


def rows_per_group(config, process_count: int) -> dict[str, int]:
    """Rows of each group in one process's batch (the exact quota), or a clear error."""
    q = config.data.quota
    rows, total = int(config.data.packs_per_batch), int(q.seg) + int(q.vqa)
    if str(q.mode) != "samples" or total < 1 or int(q.seg) < 0 or int(q.vqa) < 0:
        raise ValueError(f"config.data.quota: OmniGen2 rows take mode 'samples' with seg, vqa >= 0 (got "
                         f"{q.mode!r}, {q.seg}, {q.vqa})")
    if rows % process_count or (rows // process_count) % total:
        raise ValueError(f"config.data.packs_per_batch={rows} (samples per step) must split into {process_count} "
                         f"process(es) x whole groups of seg+vqa = {total} samples")
    local = rows // process_count
    return {"seg": local * int(q.seg) // total, "vqa": local * int(q.vqa) // total}


class TrainIterator:
    """Host batches of this process; checkpointable; ``stats`` with the realised seg:VQA ratio."""

    def __init__(self, config, *, process_index: int = 0, process_count: int = 1, sources: dict | None = None):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
        self.process_index, self.process_count = process_index, process_count
        self.rows = rows_per_group(config, process_count)
        self.quota = {g: int(config.data.quota[g]) for g in GROUPS}
        self.groups = sum(self.rows.values()) // sum(self.quota.values())
        srcs = sources if sources is not None else pipeline.default_sources(config)
        tok = get_tokenizer(config)
        for g, n in self.rows.items():
            if n and g not in srcs:
                raise ValueError(f"config.data.quota.{g} > 0 but no {g} source")
        self.streams = {g: pipeline.build_stream(config, srcs[g], g, process_index, process_count, tok, PlanFn)
                        for g, n in self.rows.items() if n}
        self.skipped = {g: SkipCounter() for g in self.streams}
        self.totals = {"batches": 0, "seg": 0, "vqa": 0}

    def __iter__(self):
        return self

    def _pull(self, group: str) -> dict:
        return pull_valid(self.streams[group], self.skipped[group], group)

    def _pattern(self) -> list[str]:
        """The rows' groups: the quota's group ([seg] x q.seg + [vqa] x q.vqa) repeated, so that a
        micro-batch of rows j, j+K, ... (K a multiple of the group size) holds one task only."""
        return ([g for g in GROUPS for _ in range(self.quota[g])]) * self.groups

    def __next__(self) -> dict:
        rows = [self._pull(g) for g in self._pattern()]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "index"}
        self.totals["batches"] += 1
        for g in GROUPS:
            self.totals[g] += self.rows[g]
        return batch

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "process_index": self.process_index, "process_count": self.process_count,
                "positions": {g: s.pos for g, s in self.streams.items()},
                "skipped": {g: c.as_dict() for g, c in self.skipped.items()}, "totals": dict(self.totals)}

    def set_state(self, state: dict) -> None:
        state = pipeline.restore_positions(state, STATE_VERSION, self.process_index, self.process_count,
                                           self.streams)
        self.skipped = {g: SkipCounter() for g in self.streams}
        for g, d in state["skipped"].items():
            self.skipped[g].merge(d)
        self.totals = dict(state["totals"])

    def stats(self) -> dict:
        t = self.totals
        return {"batches": t["batches"], "n_seg": t["seg"], "n_vqa": t["vqa"],
                "seg_per_vqa": t["seg"] / t["vqa"] if t["vqa"] else None,
                "skipped": {g: {r: n for r, n in c.as_dict()["skipped"].items() if n} for g, c in self.skipped.items()}}

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1, sources: dict | None = None):
    """OmniGen2's training input API (the loop picks it by ``config.model.family``)."""
    return TrainIterator(config, process_index=process_index, process_count=process_count, sources=sources)
