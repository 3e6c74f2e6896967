"""The training input pipeline: Grain MapDatasets per task -> plans -> mixing with quotas -> packed host batches.

    it = make_train_iterator(config, process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)          # dict of numpy arrays, leading dim packs_per_batch // process_count
    state = it.get_state()    # JSON-serialisable; it.set_state(state) resumes exactly
    it.stats()                # skipped-by-reason counts, realised seg:VQA ratios, packing efficiency

Per task group (``seg``, ``vqa``) one stream is built (Grain's MapDataset -> IterDataset pattern):
``MapDataset.source(src).shuffle(seed).repeat()`` (a global shuffle that is redrawn every epoch: Grain's
shuffle-then-repeat draws a new permutation per epoch), then this process's slice ``[process_index::
process_count]`` of that infinite sequence (no two processes ever read the same position; within an epoch
every record is read exactly once across processes), then one map step: decode -> transforms -> plan ->
budget check (-> cached latents). Bad samples (``records.BadSample``, from decode or from the plan) become
``{"skip": reason}`` elements that the mixer counts and skips. Per-element randomness (instruction template,
text CFG dropout) comes from ``np.random.default_rng([seed, group, global position])``, so it does not
depend on workers, processes or restarts.

With ``config.data.workers > 0`` the map step runs in Grain worker processes (``mp_prefetch``); with 0 it runs
in-process. Either way the stream position is a plain integer, and the iterator state is
``{stream positions, carried samples (group, position), counters}``: restoring rebuilds each stream at its
position and re-reads carried samples by position, so the batches after a restore equal the uninterrupted
ones. (Worker prefetch buffers are simply rebuilt; nothing is skipped.)
"""

from __future__ import annotations

import abc
import collections
import copy
import json

import grain
import numpy as np

from sgt_jax.data import plans, records, templates
from sgt_jax.data.mixing import GROUPS, Mixer
from sgt_jax.data.packing import BatchLayout, assemble_batch, efficiency
from sgt_jax.data.bad_data import SkipCounter
from sgt_jax.data.latent_cache import LatentCache
from sgt_jax.data.records import BadSample
from sgt_jax.data.tokenizer import get_tokenizer
from sgt_jax.data.transforms import Transforms

STATE_VERSION = 1
_GROUP_SEED = {"seg": 0x5E6, "vqa": 0x7CA}


class PlanStep(abc.ABC):
    """The Grain map step's frame, shared by every model family: (position, raw record) -> a plan dict, or
    ``{"skip": reason}`` for a bad sample. It decodes the record, checks its task against the stream's
    group, gives the subclass's ``plan`` a random stream keyed by (seed, group, global position), and
    stamps the position. Picklable for workers."""

    def __init__(self, config, source, group: str, process_index: int, process_count: int, tokenizer=None):
        self.source, self.group = source, group
        self.seed = int(config.data.seed)
        self.p, self.n = process_index, process_count
        self.tok = tokenizer if tokenizer is not None else get_tokenizer(config)
        self.instructions = templates.instruction_lists(config)

    @abc.abstractmethod
    def plan(self, sample: dict, rng: np.random.Generator) -> dict:
        """One decoded sample of this stream's group -> its plan; raise ``BadSample`` to skip it."""

    def __call__(self, position: int, raw) -> dict:
        try:
            sample = self.source.decode(raw)
            if sample["task"] not in (records.SEG_TASKS if self.group == "seg" else (records.VQA_TASK,)):
                raise BadSample("bad_record", f"{sample['key']}: task {sample['task']!r} in the {self.group} stream")
            rng = np.random.default_rng([self.seed, _GROUP_SEED[self.group], position * self.n + self.p])
            out = self.plan(sample, rng)
        except BadSample as err:
            return {"skip": err.reason, "detail": err.detail, "index": position}
        out["index"] = position
        return out

    def instruction(self, sample: dict, rng: np.random.Generator) -> str:
        """A segmentation sample's instruction, drawn from its task's templates."""
        options = templates.templates_for(sample["task"], self.instructions)
        return options[int(rng.integers(len(options)))]


class PlanFn(PlanStep):
    """BAGEL's map step: the SGT plan (instruction, text dropout) or the VQA plan, the pack budget check, and
    the cached VAE latents attached when ``data.latents = "cached"``."""

    def __init__(self, config, source, group: str, process_index: int, process_count: int, tokenizer=None):
        super().__init__(config, source, group, process_index, process_count, tokenizer)
        self.tfm = Transforms.from_config(config)
        self.layout = BatchLayout.from_config(config)
        self.text_dropout = float(config.data.text_cond_dropout)
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"config.data.text_cond_dropout must be in [0, 1], got {self.text_dropout}")
        self.latents = None
        if self.layout.latents == "cached":
            if not config.data.latent_cache:
                raise ValueError("config.data.latents='cached' needs config.data.latent_cache (the folder written "
                                 "by --mode prepare); use latents='online' to encode in the step instead")
            self.latents = LatentCache(config.data.latent_cache, config)  # checks the index now, reads lazily

    def plan(self, sample: dict, rng: np.random.Generator) -> dict:
        if self.group == "seg":
            instruction = self.instruction(sample, rng)
            plan = plans.sgt_plan(sample, instruction, self.tok, self.tfm,
                                  drop_text=bool(rng.random() < self.text_dropout))
        else:
            plan = plans.vqa_plan(sample, self.tok, self.tfm)
        plans.check_budget(plan, self.layout.budget)
        if self.latents is not None:
            self.latents.attach(plan)
            plan["vae_images"] = []  # the pixels are not needed any more (smaller IPC)
        return plan


class Stream:
    """One task group's infinite, process-sliced, planned MapDataset with an integer read position."""

    def __init__(self, dataset, workers: int, worker_buffer: int):
        self.ds, self.workers, self.worker_buffer = dataset, workers, worker_buffer
        self.pos = 0
        self._it = None

    def _iterator(self):
        if self._it is None and self.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app
                flags.FLAGS.mark_as_parsed()  # (tests, notebooks) use the flag defaults
            it_ds = self.ds[self.pos:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                                   per_worker_buffer_size=self.worker_buffer))
            self._it = iter(it_ds)
        return self._it

    def next(self) -> dict:
        it = self._iterator()
        el = _own(next(it)) if it is not None else self.ds[self.pos]
        if el["index"] != self.pos:
            raise RuntimeError(f"stream out of step: got position {el['index']}, expected {self.pos}")
        self.pos += 1
        return el

    def fetch(self, position: int) -> dict:
        return self.ds[position]

    def set_pos(self, pos: int) -> None:
        self.close()
        self.pos = int(pos)

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def _own(el: dict) -> dict:
    """Plain numpy copies of a worker's element (Grain hands large arrays over in shared memory, whose
    lifetime must not be tied to carried samples)."""
    out = {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in el.items()}
    if "vae_images" in out:
        out["vae_images"] = [np.array(v) for v in out["vae_images"]]
    return out


def build_stream(config, source, group: str, process_index: int, process_count: int, tokenizer=None,
                 plan_fn=None) -> Stream:
    """The stream of ``group`` over ``source`` (len + __getitem__ raw records + decode). ``plan_fn``: the
    map step's class (same constructor as PlanFn; default PlanFn, BAGEL's plans)."""
    if len(source) == 0:
        raise ValueError(f"the {group} source {source!r} is empty")
    fn = (plan_fn or PlanFn)(config, source, group, process_index, process_count, tokenizer)
    ds = grain.MapDataset.source(source).shuffle(seed=int(config.data.seed) + _GROUP_SEED[group]).repeat()
    ds = ds[process_index::process_count].map_with_index(fn)
    return Stream(ds, int(config.data.workers), int(config.data.worker_buffer))


def restore_positions(state: dict, version: int, process_index: int, process_count: int, streams: dict) -> dict:
    """Check an iterator state's version, process and streams, set the streams' positions; returns the
    state as JSON gives it back."""
    state = json.loads(json.dumps(state))  # accept exactly what JSON gives back
    if state.get("version") != version:
        raise ValueError(f"data iterator state version {state.get('version')} != {version}")
    if (state["process_index"], state["process_count"]) != (process_index, process_count):
        raise ValueError(f"data iterator state is for process {state['process_index']}/{state['process_count']}"
                         f", this is {process_index}/{process_count}")
    if set(state["positions"]) != set(streams):
        raise ValueError(f"state streams {sorted(state['positions'])} != configured {sorted(streams)}")
    for grp, pos in state["positions"].items():
        streams[grp].set_pos(pos)
    return state


def default_sources(config) -> dict:
    """{group: source} from ``config.data.sources`` (sgt_jax/data/sources); a VQA kind "none" is left out."""
    from sgt_jax.data.sources import build_seg_source, build_vqa_source

    out = {"seg": build_seg_source(config)}
    vqa = build_vqa_source(config)
    if vqa is not None:
        out["vqa"] = vqa
    return out


class TrainIterator:
    """Host batches of this process; checkpointable (``get_state``/``set_state``), with ``stats``."""

    def __init__(self, config, *, process_index: int = 0, process_count: int = 1, sources: dict | None = None):
        g = int(config.data.packs_per_batch)
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
        if g % process_count:
            raise ValueError(f"config.data.packs_per_batch={g} is not divisible by process_count={process_count}")
        self.config = config
        self.process_index, self.process_count = process_index, process_count
        self.layout = BatchLayout.from_config(config)
        srcs = sources if sources is not None else default_sources(config)
        quota = {k: config.data.quota[k] for k in ("mode",) + GROUPS}
        tok = get_tokenizer(config)
        self.streams = {grp: build_stream(config, srcs[grp], grp, process_index, process_count, tok)
                        for grp in GROUPS if quota[grp] > 0}
        for grp in GROUPS:
            if quota[grp] > 0 and grp not in srcs:
                raise ValueError(f"config.data.quota.{grp}={quota[grp]} but no {grp} source")
        self.mixer = Mixer(self.streams, quota, self.layout.budget, g // process_count,
                           int(config.data.pack_buffer))
        self._eff_sum = {}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = assemble_batch(self.mixer.next_packs(), self.layout)
        for k, v in efficiency(batch, self.layout.budget).items():
            self._eff_sum[k] = self._eff_sum.get(k, 0.0) + v
        return batch

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION, "process_index": self.process_index, "process_count": self.process_count,
            "positions": {grp: s.pos for grp, s in self.streams.items()},
            "mixer": self.mixer.get_state(), "efficiency_sum": dict(self._eff_sum),
        }

    def set_state(self, state: dict) -> None:
        state = restore_positions(state, STATE_VERSION, self.process_index, self.process_count, self.streams)
        self.mixer.set_state(state["mixer"])
        self._eff_sum = dict(state["efficiency_sum"])

    @staticmethod
    def reshard_states(states: list[dict], process_index: int, process_count: int) -> tuple[dict, int]:
        """See the module-level ``reshard_states`` (elastic resume on another number of processes)."""
        return reshard_states(states, process_index, process_count)

    def stats(self) -> dict:
        """Mixer stats (ratios, skips by reason) + mean packing efficiency per budget over all batches."""
        out = copy.deepcopy(self.mixer.stats())
        nb = max(out["batches"], 1)
        out["efficiency"] = {k: v / nb for k, v in self._eff_sum.items()}
        total = collections.Counter()
        for grp in out["skipped"].values():
            total.update(grp)
        out["skipped_total"] = {r: total[r] for r in records.REASONS if total[r]}  # records.py's order
        return out

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


def reshard_states(states: list[dict], process_index: int, process_count: int) -> tuple[dict, int]:
    """This process's iterator state, built from the states that ``len(states)`` processes saved, for a
    run with ``process_count`` processes (elastic resume: a pod resumed on another size). Returns
    ``(state, skipped)``.

    Each group's stream is one global shuffled sequence; old process ``i`` of ``P`` read its positions
    ``i, i+P, ...`` up to its own read position. The new processes start right after the furthest
    position any old process read, so nothing is read twice, but the positions below it that a slower
    old process had not reached yet are never read in this epoch: ``skipped`` counts them (at most about
    ``P`` x the spread of the old read positions; small next to an epoch). Samples the old processes had
    read but not yet packed (their carry) are handed to the new process that owns their global position
    and are packed first. The counters (totals, skips, efficiency sums) move to process 0 summed, so the
    run's statistics stay whole. The batches that follow are therefore NOT those of an uninterrupted run
    with the old layout (that is impossible with another number of processes), and the realised seg:VQA
    quota is unaffected (the mixer enforces it per batch)."""
    old_count = len(states)
    if not states or any(s.get("version") != STATE_VERSION for s in states):
        raise ValueError(f"cannot reshard data iterator states of versions {[s.get('version') for s in states]}")
    if sorted(s["process_index"] for s in states) != list(range(old_count)) or \
            any(s["process_count"] != old_count for s in states):
        raise ValueError("the saved data iterator states are not one per process of one run")
    states = sorted(states, key=lambda s: s["process_index"])
    groups = sorted(states[0]["positions"])
    positions, skipped = {}, 0
    for g in groups:
        read = [s["process_index"] + s["positions"][g] * old_count for s in states]  # first unread global pos.
        frontier = max(read)
        skipped += sum(-(-(frontier - r) // old_count) for r in read)
        positions[g] = -(-(frontier - process_index) // process_count)  # first local index >= frontier
    carry = []
    for s in states:
        for g, idx in s["mixer"]["carry"]:
            pos = s["process_index"] + int(idx) * old_count
            if pos % process_count == process_index:
                carry.append([g, pos // process_count])
    mixer = {"carry": carry, "skipped": {}, "totals": {k: 0 for k in states[0]["mixer"]["totals"]}}
    eff = {k: 0.0 for k in states[0]["efficiency_sum"]}
    for g in states[0]["mixer"]["skipped"]:
        counter = SkipCounter()
        if process_index == 0:
            for s in states:
                counter.merge(s["mixer"]["skipped"][g])
        mixer["skipped"][g] = counter.as_dict()
    if process_index == 0:
        for s in states:
            for k, v in s["mixer"]["totals"].items():
                mixer["totals"][k] += v
            for k, v in s["efficiency_sum"].items():
                eff[k] += v
    return {"version": STATE_VERSION, "process_index": process_index, "process_count": process_count,
            "positions": positions, "mixer": mixer, "efficiency_sum": eff}, skipped


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1, sources: dict | None = None):
    """THE training input API (see module docstring). ``sources`` ({"seg": src, "vqa": src}) overrides
    ``config.data.sources`` (tests, notebooks)."""
    return TrainIterator(config, process_index=process_index, process_count=process_count, sources=sources)
