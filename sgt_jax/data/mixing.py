"""Mixing seg and VQA samples into the packs of one batch with an explicit quota (the paper's 2:1 seg:VQA
ratio, which song2yu/SGT's BAGEL data code does not enforce).

The released BAGEL code does not enforce the paper's 2:1 seg:VQA ratio (its weighted sampler realises about
0.3:1). Here every batch gets an explicit quota (``config.data.quota``), and the samples are chosen from a
buffer of candidates (``config.data.pack_buffer`` per group, topped up from the group's stream):

* ``mode="samples"`` (default): samples are placed in GROUPS of ``seg`` seg samples + ``vqa`` VQA samples
  (2+1). A group is placed atomically (all of it or nothing); when no choice of candidates completes a group
  any more, the batch is closed and the candidates stay buffered for the next batch. So every batch holds an
  exact multiple of the quota. Since each process applies this to its own packs, the global batch (the sum
  over processes) holds an exact multiple too.
* ``mode="tokens"``: one sample at a time, from the group whose share of the batch's tokens (und + gen) is
  furthest below its target share; the batch is closed when none of that group's candidates fits.

Choosing a member: a segmentation member is the candidate (and pack) that, as the batch stands, leaves the
least latent room that no combination of the other buffered latent blocks could fill (a subset sum over their
sizes), larger first on ties. Otherwise (VQA, or no segmentation candidate fits as the batch stands) the
candidates are tried largest (und + gen tokens) first, then oldest first, and the first that fits is taken:
into a pack as the batch stands (:func:`packing.place`), or else with the whole batch packed anew
(:func:`packing.pack_plans`, first-fit decreasing). A VQA sample is first tried only in packs that keep und
room for the latents still free there (the und tokens per latent token of the buffered segmentation samples),
so VQA does not lock latent room away from the segmentation samples of later groups. Deterministic (ties: lower
index). Fairness: a candidate that has waited while ``4 · pack_buffer`` later samples of its group were read is
OVERDUE and tried before all others, so no sample waits for ever and the stream is consumed close to its
shuffled order. ``pack_buffer=1``: each member is the next sample of its stream.

Fit policy: nothing is ever dropped for not fitting a partly filled batch; it stays a candidate. A sample
that cannot fit an EMPTY pack was already rejected as ``over_budget`` (plans.check_budget) and counted. The
one imperfect case: a group that does not fit even an EMPTY batch (e.g. 1 pack per process and three large
samples) is split; the members that fit are emitted, and the batch is counted in ``quota_breaks`` (its
ratio is then not exact). Realised ratios and efficiency are in :meth:`Mixer.stats`.

The mixer's state (JSON) is the candidate buffer as ``(group, stream index)`` in buffer order (key ``carry``)
plus counters; candidates are re-read from their stream by index on restore, so resuming reproduces the
uninterrupted batches exactly.
"""

from __future__ import annotations

import collections

from sgt_jax.data.bad_data import SkipCounter
from sgt_jax.data.packing import PackBudget, PackUsage, pack_plans, place
from sgt_jax.data.records import BadSample

GROUPS = ("seg", "vqa")
MAX_CONSECUTIVE_SKIPS = 10_000  # a source that yields only bad samples is a configuration error, not data
OVERDUE_FACTOR = 4  # a candidate is overdue after OVERDUE_FACTOR * buffer later reads of its group


def _best_subset_sum(free: int, sizes: collections.Counter, used: int) -> int:
    """The largest total <= ``free`` of a sub-multiset of ``sizes`` (size -> count), one ``used`` taken out."""
    reach = 1  # bit t set: total t is reachable
    mask = (1 << (free + 1)) - 1
    for size, count in sizes.items():
        for _ in range(min(count - (size == used), free // size)):
            reach = (reach | (reach << size)) & mask
    return reach.bit_length() - 1


class _Batch:
    """The plans chosen for a batch so far and the pack of each (immutable: ``add`` returns a new one)."""

    def __init__(self, plans: list[dict], where: list[int]):
        self.plans, self.where = plans, where

    def usage(self, n_packs: int) -> list[PackUsage]:
        packs = [PackUsage() for _ in range(n_packs)]
        for p, i in zip(self.plans, self.where):
            packs[i].add(p)
        return packs

    def put(self, plan: dict, pack: int) -> "_Batch":
        return _Batch(self.plans + [plan], self.where + [pack])

    def add(self, plan: dict, n_packs: int, budget: PackBudget, reserve: float = 0.0, min_gen: int = 0) -> "_Batch | None":
        packs = self.usage(n_packs)
        j = place(packs, plan, budget, reserve, min_gen)
        if j >= 0:
            return _Batch(self.plans + [plan], self.where + [j])
        if reserve:
            return None
        where = pack_plans(self.plans + [plan], n_packs, budget)
        return None if where is None else _Batch(self.plans + [plan], where)


def pull_valid(stream, skipped: SkipCounter, group: str) -> dict:
    """The next good element of ``stream``; bad ones (``{"skip": reason}``) are counted in ``skipped``."""
    for _ in range(MAX_CONSECUTIVE_SKIPS):
        el = stream.next()
        if "skip" in el:
            skipped.add_skip(BadSample(el["skip"], el.get("detail", "")))
            continue
        skipped.add_ok()
        return el
    raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} consecutive bad {group} samples: check the data source "
                       f"(skips so far: {skipped.as_dict()})")


class Mixer:
    """Fills ``packs`` packs per batch from ``streams`` (group -> stream with next()/fetch(index)/pos), choosing
    samples by best fit from ``buffer`` candidates per group."""

    def __init__(self, streams: dict, quota, budget: PackBudget, packs: int, buffer: int = 1):
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
        if int(buffer) < 1:
            raise ValueError(f"config.data.pack_buffer must be >= 1, got {buffer}")
        self.streams, self.budget, self.packs, self.buffer = streams, budget, packs, int(buffer)
        self.cands: dict[str, list[dict]] = {g: [] for g in GROUPS}  # per group, in arrival order
        self.skipped = {g: SkipCounter() for g in GROUPS}  # per group, by reason (sgt_jax/data/bad_data.py)
        self.totals = {"batches": 0, "quota_breaks": 0, "seg": 0, "vqa": 0, "seg_tokens": 0, "vqa_tokens": 0}
        self._batch_tokens = {g: 0 for g in GROUPS}

    # -- pulling samples -------------------------------------------------------------------------------
    def _pull(self, group: str) -> dict:
        return pull_valid(self.streams[group], self.skipped[group], group)

    def _candidates(self, group: str, need: int = 1) -> list[dict]:
        """The group's buffer, topped up to ``buffer`` samples (and to ``need``, the members a group takes)."""
        cands = self.cands[group]
        while len(cands) < max(self.buffer, need):
            cands.append(self._pull(group))
        return cands

    def _overdue(self, group: str, cand: dict) -> bool:
        return cand["index"] < self.streams[group].pos - 1 - OVERDUE_FACTOR * self.buffer

    # -- one batch ---------------------------------------------------------------------------------------
    def next_packs(self) -> list[list[dict]]:
        """The plans of each pack of the next batch."""
        self._batch_tokens = {g: 0 for g in GROUPS}
        batch = _Batch([], [])
        while True:
            wanted = self._wanted()
            trial = self._choose(batch, wanted)
            if trial is not None:
                batch = trial
                for c in batch.plans[-len(wanted):]:
                    self._batch_tokens[c["group"]] += c["n_und"] + c["n_gen"]
                continue
            if not batch.plans:  # the unit does not fit even an empty batch: emit the members that fit
                self.totals["quota_breaks"] += 1
                for g in wanted:
                    batch = self._choose(batch, [g]) or batch
                if not batch.plans:
                    raise RuntimeError("a sample fits no empty pack; plans.check_budget should have rejected it")
            break
        packs = [[] for _ in range(self.packs)]
        for plan, i in zip(batch.plans, batch.where):
            packs[i].append(plan)
            self.cands[plan["group"]] = [c for c in self.cands[plan["group"]] if c is not plan]
            self._count(plan)
        self.totals["batches"] += 1
        return packs

    def _seg_fit(self, batch: "_Batch", cands: list[dict]) -> list[tuple[int, int]]:
        """Per candidate with latents: ``(waste, pack)`` of its best pack as the batch stands, where ``waste`` is
        the gen room that pack would keep that no combination of the OTHER buffered latent blocks can fill
        (a subset-sum over their sizes); ``(huge, -1)`` when it fits no pack."""
        packs = batch.usage(self.packs)
        taken = {id(x) for x in batch.plans}
        sizes = collections.Counter(x["n_gen"] for x in self.cands["seg"] if id(x) not in taken and x["n_gen"])
        memo, out = {}, []
        for c in cands:
            best = (1 << 62, -1)
            for j, p in enumerate(packs):
                if p.fits(c, self.budget):
                    free = self.budget.gen_tokens - p.gen - c["n_gen"]
                    if (free, c["n_gen"]) not in memo:
                        memo[free, c["n_gen"]] = free - _best_subset_sum(free, sizes, c["n_gen"])
                    best = min(best, (memo[free, c["n_gen"]], j))
            out.append(best)
        return out

    def _und_per_gen(self) -> float:
        """Und tokens per latent token of the buffered segmentation samples (their und share, kept free)."""
        seg = self.cands["seg"]
        gen = sum(c["n_gen"] for c in seg)
        return sum(c["n_und"] for c in seg) / gen if gen else 0.0

    def _wanted(self) -> list[str]:
        """The groups of the next unit to place: a whole quota group, or (tokens mode) the group most behind."""
        if self.mode == "samples":
            return [g for g in GROUPS for _ in range(self.ratio[g])]
        s, v = self.ratio["seg"], self.ratio["vqa"]
        ts, tv = self._batch_tokens["seg"], self._batch_tokens["vqa"]
        return ["seg" if v == 0 or (s > 0 and ts * v <= tv * s) else "vqa"]

    def _choose(self, batch: "_Batch", wanted: list[str]) -> "_Batch | None":
        """``batch`` plus one candidate per entry of ``wanted``, or None if no such choice fits (module doc).

        A segmentation member is the candidate whose best pack as the batch stands keeps the least latent room
        that the other buffered latent blocks cannot fill (:meth:`_seg_fit`; overdue first, then larger, then
        older). Otherwise (VQA, or no segmentation candidate fits as things stand) the candidates are tried
        overdue first, then largest in tokens, then oldest, VQA first only where und room for the pack's free
        latents stays (``reserve``), and the first that goes into a pack (:func:`place`) or packs with the
        whole batch anew (:func:`pack_plans`) is taken."""
        for g in wanted:
            taken = {id(c) for c in batch.plans}
            cands = [c for c in self._candidates(g, 1 + sum(c["group"] == g for c in batch.plans)) if id(c) not in taken]
            if g == "seg":  # the latent block that leaves the least unusable latent room, where it stands
                fit = self._seg_fit(batch, cands)
                order = sorted(range(len(cands)), key=lambda i: (not self._overdue(g, cands[i]), fit[i][0],
                                                                  -cands[i]["n_gen"], i))
                if fit[order[0]][1] >= 0:
                    batch = batch.put(cands[order[0]], fit[order[0]][1])
                    continue
            order = sorted(range(len(cands)), key=lambda i: (not self._overdue(g, cands[i]),
                                                              -(cands[i]["n_und"] + cands[i]["n_gen"]), i))
            reserve = self._und_per_gen() if g != "seg" else 0.0
            overdue = [i for i in order if self._overdue(g, cands[i])]
            rest = [i for i in order if not self._overdue(g, cands[i])]
            # overdue candidates anywhere first; then the others keeping und room for latents, then anywhere
            attempts = [(i, 0.0) for i in overdue] + [(i, reserve) for i in rest] + \
                ([(i, 0.0) for i in rest] if reserve else [])
            for i, res in attempts:
                min_gen = min((c["n_gen"] for c in self.cands["seg"] if c is not cands[i]), default=0)
                grown = batch.add(cands[i], self.packs, self.budget, res, min_gen)
                if grown is not None:
                    batch = grown
                    break
            else:
                return None
        return batch

    def _count(self, plan: dict) -> None:
        g = plan["group"]
        tok = plan["n_und"] + plan["n_gen"]
        self.totals[g] += 1
        self.totals[g + "_tokens"] += tok

    # -- state and metrics -------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {
            "carry": [[g, int(p["index"])] for g in GROUPS for p in self.cands[g]],
            "skipped": {g: c.as_dict() for g, c in self.skipped.items()},
            "totals": dict(self.totals),
        }

    def set_state(self, state: dict) -> None:
        self.cands = {g: [] for g in GROUPS}
        for g, i in state["carry"]:
            p = self.streams[g].fetch(int(i))
            if "skip" in p:
                raise RuntimeError(f"buffered sample {p.get('index')} now decodes as bad ({p['skip']}): the data "
                                   "changed since the checkpoint")
            self.cands[g].append(p)
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
            "carried": sum(len(c) for c in self.cands.values()),
        }
