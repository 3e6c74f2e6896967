"""Mixing seg and VQA samples into the packs of one batch with an explicit quota (the paper's 2:1 seg:VQA
ratio, which song2yu/SGT's BAGEL data code does not enforce).

The released BAGEL code does not enforce the paper's 2:1 seg:VQA ratio (its weighted sampler realises about
0.3:1). Here every batch gets an explicit quota (``config.data.quota``):

* ``mode="samples"`` (default): samples arrive in GROUPS of ``seg`` seg samples + ``vqa`` VQA samples (2+1).
  A group is placed atomically (first-fit over the batch's packs, all of it or nothing). When a group does not
  fit, the batch is closed and the WHOLE group is carried to the next batch, where it is placed first. So every
  batch holds an exact multiple of the quota. Since each process applies this to its own packs, the global
  batch (the sum over processes) holds an exact multiple too.
* ``mode="tokens"``: one sample at a time from the group whose share of the batch's tokens (und + gen) is
  furthest below its target share; when it does not fit, the batch is closed and that sample is carried.

Fit policy: nothing is ever dropped for not fitting a partly filled batch; it is carried (at most one group).
A sample that cannot fit an EMPTY pack was already rejected as ``over_budget`` (plans.check_budget) and
counted. The one imperfect case: a group that does not fit even an EMPTY batch (e.g. 1 pack per process and
three large samples) is split; the samples that fit are emitted, the rest are carried, and the batch is
counted in ``quota_breaks`` (its ratio is then not exact). Realised ratios and efficiency are in
:meth:`Mixer.stats`.

The mixer's state (JSON) is the carried samples as ``(group, stream index)`` plus counters; carried samples
are re-read from their stream by index on restore, so resuming reproduces the uninterrupted batches exactly.
"""

from __future__ import annotations

from sgt_jax.data.bad_data import SkipCounter
from sgt_jax.data.packing import PackBudget, PackUsage, first_fit
from sgt_jax.data.records import BadSample

GROUPS = ("seg", "vqa")
MAX_CONSECUTIVE_SKIPS = 10_000  # a source that yields only bad samples is a configuration error, not data


class Mixer:
    """Fills ``packs`` packs per batch from ``streams`` (group -> stream with next()/fetch(index))."""

    def __init__(self, streams: dict, quota, budget: PackBudget, packs: int):
        self.mode = quota["mode"]
        if self.mode not in ("samples", "tokens"):
            raise ValueError(f"config.data.quota.mode must be 'samples' or 'tokens', got {self.mode!r}")
        self.ratio = {g: int(quota[g]) for g in GROUPS}
        if any(r < 0 for r in self.ratio.values()) or sum(self.ratio.values()) == 0:
            raise ValueError(f"config.data.quota seg/vqa must be >= 0 and not both 0, got {self.ratio}")
        missing = [g for g in GROUPS if self.ratio[g] and g not in streams]
        if missing:
            raise ValueError(f"quota asks for {missing} samples but no such stream was built")
        if packs < 1:
            raise ValueError(f"packs per batch must be >= 1, got {packs}")
        self.streams, self.budget, self.packs = streams, budget, packs
        self.carry: list[dict] = []
        self.skipped = {g: SkipCounter() for g in GROUPS}  # per group, by reason (sgt_jax/data/bad_data.py)
        self.totals = {"batches": 0, "quota_breaks": 0, "seg": 0, "vqa": 0, "seg_tokens": 0, "vqa_tokens": 0}
        self._batch_tokens = {g: 0 for g in GROUPS}

    # -- pulling samples -------------------------------------------------------------------------------
    def _pull(self, group: str) -> dict:
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            el = self.streams[group].next()
            if "skip" in el:
                self.skipped[group].add_skip(BadSample(el["skip"], el.get("detail", "")))
                continue
            self.skipped[group].add_ok()
            return el
        raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} consecutive bad {group} samples: check the data source "
                           f"(skips so far: {self.skipped[group].as_dict()})")

    def _next_pending(self) -> list[dict]:
        if self.carry:
            pending, self.carry = self.carry, []
            return pending
        if self.mode == "samples":
            return [self._pull(g) for g in GROUPS for _ in range(self.ratio[g])]
        # tokens: the group furthest below its target token share (ties -> seg)
        s, v = self.ratio["seg"], self.ratio["vqa"]
        ts, tv = self._batch_tokens["seg"], self._batch_tokens["vqa"]
        group = "seg" if v == 0 or (s > 0 and ts * v <= tv * s) else "vqa"
        return [self._pull(group)]

    # -- one batch ---------------------------------------------------------------------------------------
    def next_packs(self) -> list[list[dict]]:
        """The plans of each pack of the next batch."""
        packs = [PackUsage() for _ in range(self.packs)]
        self._batch_tokens = {g: 0 for g in GROUPS}
        n_placed = 0
        while True:
            pending = self._next_pending()
            placed = self._place_all(packs, pending)
            if placed:
                n_placed += len(pending)
                continue
            if n_placed == 0:  # does not fit even an empty batch: emit what fits, carry the rest
                rest = [p for p in pending if not self._place_one(packs, p)]
                self.carry = rest
                self.totals["quota_breaks"] += 1
                if len(rest) == len(pending):
                    raise RuntimeError("a sample fits no empty pack; plans.check_budget should have rejected it")
            else:
                self.carry = pending
            break
        self.totals["batches"] += 1
        return [p.plans for p in packs]

    def _place_one(self, packs: list[PackUsage], plan: dict) -> bool:
        i = first_fit(packs, plan, self.budget)
        if i < 0:
            return False
        packs[i].add(plan)
        self._count(plan)
        return True

    def _place_all(self, packs: list[PackUsage], pending: list[dict]) -> bool:
        """First-fit every plan of ``pending``, all or nothing."""
        shadow = [PackUsage(p.und, p.gen, p.vit, p.ce, p.vae) for p in packs]
        where = []
        for plan in pending:
            i = first_fit(shadow, plan, self.budget)
            if i < 0:
                return False
            shadow[i].add(plan)
            where.append(i)
        for plan, i in zip(pending, where):
            packs[i].add(plan)
            self._count(plan)
        return True

    def _count(self, plan: dict) -> None:
        g = plan["group"]
        tok = plan["n_und"] + plan["n_gen"]
        self.totals[g] += 1
        self.totals[g + "_tokens"] += tok
        self._batch_tokens[g] += tok

    # -- state and metrics -------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {
            "carry": [[p["group"], int(p["index"])] for p in self.carry],
            "skipped": {g: c.as_dict() for g, c in self.skipped.items()},
            "totals": dict(self.totals),
        }

    def set_state(self, state: dict) -> None:
        self.carry = [self.streams[g].fetch(int(i)) for g, i in state["carry"]]
        for p in self.carry:
            if "skip" in p:
                raise RuntimeError(f"carried sample {p.get('index')} now decodes as bad ({p['skip']}): the data "
                                   "changed since the checkpoint")
        self.skipped = {g: SkipCounter() for g in GROUPS}
        for g, d in state["skipped"].items():
            self.skipped[g].merge(d)
        self.totals = dict(state["totals"])

    def stats(self) -> dict:
        """Realised seg:VQA ratios (by samples and by tokens) and skipped-by-reason counts."""
        t = self.totals
        n = t["seg"] + t["vqa"]
        tok = t["seg_tokens"] + t["vqa_tokens"]
        return {
            "batches": t["batches"], "quota_breaks": t["quota_breaks"], "n_seg": t["seg"], "n_vqa": t["vqa"],
            "seg_sample_share": t["seg"] / n if n else 0.0,
            "seg_token_share": t["seg_tokens"] / tok if tok else 0.0,
            "seg_per_vqa": t["seg"] / t["vqa"] if t["vqa"] else float("inf") if t["seg"] else 0.0,
            "skipped": {g: {r: n for r, n in c.as_dict()["skipped"].items() if n} for g, c in self.skipped.items()},
            "skip_examples": {g: c.as_dict()["examples"] for g, c in self.skipped.items()},
            "carried": len(self.carry),
        }
