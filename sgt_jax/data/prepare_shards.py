"""Sharding ``--mode prepare`` over hosts, and the one merge that makes the result equal to a single process.

The input records of a family are cut into BLOCKS of ``records_per_shard`` consecutive indexes; block ``k``
becomes output shard ``<family>-<k>-of-<N>`` (its good records, in index order; bad ones skipped, so a shard
may hold fewer) and, in cached-latents mode, ``latents-<k>-of-<N>`` (the VAE statistics of that shard's
segmentation targets). Shard ``i`` of ``n`` prepares blocks ``i, i+n, i+2n, ...``. Every output file
therefore depends only on its block, never on how many hosts ran: merging is writing the report and the
latent index from the per-block counts, which each host leaves in ``prepare_report.part-<i>-of-<n>.json``
(and ``latents_index.part-...``). A single process is shard 0 of 1 followed by the same merge.

Which shard a process is (``config.prepare.shard``):

* ``""`` (default): under ``jax.distributed`` (``config.mesh.distributed.*`` or the ``SGT_*`` environment,
  sgt_jax/parallel/distributed.py) shard ``jax.process_index()`` of ``jax.process_count()``; the processes
  meet at a barrier when done and process 0 merges. Otherwise one process does everything.
* ``"i/n"``: shard ``i`` of ``n`` (separate machines, no JAX cluster). Each writes its part; the one that finds
  all ``n`` parts in the workdir when it finishes (a shared folder) merges.
* ``"merge"``: only merge the parts already in the workdir (e.g. after copying the hosts' folders together).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable

from sgt_jax.data.arrayrecord_io import shard_name
from sgt_jax.data.bad_data import SkipCounter

REPORT_NAME = "prepare_report.json"


def parse_shard(config) -> tuple[int, int, str]:
    """``(index, count, mode)`` of this process, mode "single", "jax" (jax.distributed), "manual" ("i/n") or
    "merge" (see module doc). Initialises ``jax.distributed`` when the config/environment describe several
    processes."""
    spec = str(config.prepare.shard).strip()
    if spec == "merge":
        return 0, 1, "merge"
    if spec:
        m = re.fullmatch(r"(\d+)/(\d+)", spec)
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"config.prepare.shard must be 'i/n' with 0 <= i < n, '' or 'merge'; got {spec!r}")
        return int(m.group(1)), int(m.group(2)), "manual"
    from sgt_jax.parallel import maybe_initialize

    if maybe_initialize(config):
        import jax

        if jax.process_count() > 1:
            return jax.process_index(), jax.process_count(), "jax"
    return 0, 1, "single"


def num_blocks(n_records: int, per_block: int) -> int:
    if per_block < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {per_block}")
    return max(1, -(-n_records // per_block))


def my_blocks(n_blocks: int, shard: tuple[int, int]) -> range:
    index, count = shard
    return range(index, n_blocks, count)


def part_name(shard: tuple[int, int], stem: str = "prepare_report") -> str:
    return f"{stem}.part-{shard[0]:05d}-of-{shard[1]:05d}.json"


def write_json(path: str, obj, indent: int | None = 2) -> None:
    """Writes ``obj`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, default=str)
    os.replace(tmp, path)


def read_parts(workdir: str, stem: str = "prepare_report") -> list[dict] | None:
    """All parts of one sharded run in ``workdir`` (by shard index), or None while some are missing."""
    pattern = re.compile(rf"^{re.escape(stem)}\.part-(\d{{5}})-of-(\d{{5}})\.json$")
    found = {}
    for path in glob.glob(os.path.join(workdir, f"{stem}.part-*.json")):
        m = pattern.match(os.path.basename(path))
        if m:
            found[int(m.group(1)), int(m.group(2))] = path
    counts = {n for _, n in found}
    if not found:
        return None
    if len(counts) != 1:
        raise ValueError(f"{workdir!r} holds {stem} parts of runs with different shard counts {sorted(counts)}; "
                         "remove the stale ones")
    n = counts.pop()
    if sorted(i for i, _ in found) != list(range(n)):
        return None
    parts = []
    for i in range(n):
        with open(found[i, n], encoding="utf-8") as f:
            parts.append(json.load(f))
    return parts


def gather_blocks(parts: list[dict], key) -> dict[int, dict]:
    """{block: entry} over all parts (``key(part)`` -> {block: entry}); each block exactly once."""
    out = {}
    for part in parts:
        for k, entry in key(part).items():
            if int(k) in out:
                raise ValueError(f"block {k} was prepared by two shards; remove the stale parts and rerun")
            out[int(k)] = entry
    return out


def family_summary(source: str, kind: str, blocks: dict[int, dict], shard_names: list[str], seconds: float) -> dict:
    """Report fields of one family over ``blocks`` ({block: {"written", "counts"}}), merged in block order (so
    the first examples of each skip reason are those a single process meets first)."""
    counter = SkipCounter(log_skips=False)
    for k in sorted(blocks):
        counter.merge(blocks[k]["counts"])
    counts = counter.as_dict()
    return {"source": source, "kind": kind, "read": counts["seen"], "written": sum(b["written"] for b in blocks.values()),
            "skipped": counts["skipped"], "skipped_total": counter.total_skipped, "examples": counts["examples"],
            "shards": shard_names, "seconds": round(seconds, 3)}


def family_report(source: str, kind: str, n_blocks: int, blocks: dict[int, dict], shard_names: list[str],
                  seconds: float) -> dict:
    """:func:`family_summary` over every block of the family (error if one is missing)."""
    missing = [k for k in range(n_blocks) if k not in blocks]
    if missing:
        raise ValueError(f"prepare: blocks {missing[:10]} of {n_blocks} are missing from the parts")
    return family_summary(source, kind, blocks, shard_names, seconds)


def merge_reports(workdir: str, merge_latents: Callable[[str], dict] | None = None) -> dict | None:
    """Writes ``prepare_report.json`` from the parts in ``workdir``, and the latent index through ``merge_latents``
    (``latent_cache.merge_latent_parts``; passed in so that this module stays below the latent cache) when a part
    has latents; returns the report, or None while parts are missing. Seconds are summed over shards (CPU time,
    not wall time)."""
    parts = read_parts(workdir)
    if parts is None:
        return None
    first = parts[0]
    report = {k: first[k] for k in ("proxy_task", "source_root", "workdir")}
    report["shards"] = len(parts)
    report["families"] = {}
    for family, fam in first["families"].items():
        blocks = gather_blocks(parts, lambda p: p["families"][family]["blocks"])
        n = fam["n_blocks"]
        report["families"][family] = family_report(
            fam["source"], fam["kind"], n, blocks, [shard_name(family, k, n) for k in range(n)],
            sum(p["families"][family]["seconds"] for p in parts))
    if any("latents" in p for p in parts):
        if merge_latents is None:
            raise ValueError("prepare: the parts hold latents but no latent merge was given")
        report["latents"] = merge_latents(workdir)
    write_json(os.path.join(workdir, REPORT_NAME), report)
    return report


def barrier(name: str) -> None:
    """Waits for every ``jax.distributed`` process (call only under jax.distributed: it starts the backend)."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
