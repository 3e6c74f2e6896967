"""``--mode prepare``: raw data -> ArrayRecord shards of canonical records (+ cached VAE latents if configured).

    python -m sgt_jax.main --mode prepare --config configs/bagel_sgt.py:7b --source /data/raw --workdir /data/prep

* For each family (seg, then vqa) whose ``config.data.sources.<family>.kind`` is a raw kind, every record is
  read, converted to its canonical form (SA-1B/COCO targets rendered once to PNG; JPEG bytes kept as they
  are) and fully decoded once to check it (with ``config.data.proxy_task``); bad samples are skipped and
  counted by reason, never written.
* ``--source`` replaces ``sources.seg.root`` and ``sources.vqa.root`` (omit it and set both in the config when
  the two live in different places). Kinds ``synthetic`` are materialised too (handy for tests and demos);
  kind ``prepared`` and ``none`` are skipped.
* Output in ``--workdir``: ``seg-NNNNN-of-NNNNN.array_record``, ``vqa-...`` (shard ``k`` holds the good records
  among input indexes ``[k·R, (k+1)·R)``, R = ``records_per_shard``), and ``prepare_report.json`` with
  counts read / written / skipped by reason (and the first few details of each reason) per family. When a
  family writes 0 samples, the CLI exits with status 1 and one line naming it and its top skip reasons. Train on
  them with ``--config.data.sources.seg.kind=prepared --config.data.sources.seg.root=<workdir>`` (same for vqa).
* ``config.data.sources.prepare_workers`` > 0 decodes in that many threads (order is kept; Pillow's JPEG/PNG
  codecs and zlib release the GIL, so threads scale on the image work without process start-up cost).
* If ``config.data.latents == "cached"``, the mode (sgt_jax/train/prepare_latents.py, which runs this
  module) then stores the targets' VAE posterior statistics (sgt_jax/data/latent_cache.py).
* Pod scale: every host prepares its own blocks (``jax.distributed``, or ``--config.prepare.shard=i/n``) and one
  merge writes the report and the latent index; the files equal a single process's
  (sgt_jax/data/prepare_shards.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from sgt_jax.data import prepare_shards
from sgt_jax.data.latent_cache import merge_latent_parts
from sgt_jax.data import sources as sources_mod
from sgt_jax.data.arrayrecord_io import WRITER_OPTIONS, pack_record, shard_name
from sgt_jax.data.bad_data import SkipCounter
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.common import decode_canonical

log = logging.getLogger(__name__)
REPORT_NAME = prepare_shards.REPORT_NAME
RAW_SKIP_KINDS = ("prepared", "none")



def _convert(src, raw, proxy_task: str) -> dict:
    """Canonical record of ``raw``, checked by decoding it exactly as training will. Raises BadSample."""
    canon = src.canonical(raw)
    decode_canonical(canon, proxy_task if src.family == "seg" else "segmentation", src.seed, src.mask_size_mismatch)
    return canon


def _convert_index(src, i: int, proxy_task: str):
    """(canonical, None) or (None, BadSample) for record ``i`` (exceptions other than BadSample propagate)."""
    try:
        return _convert(src, src[i], proxy_task), None
    except BadSample as err:
        return None, err


def prepare_family(src, out_dir: str, family: str, proxy_task: str, records_per_shard: int,
                   workers: int = 0, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> dict:
    """Converts the records of ``src`` in this shard's blocks (sgt_jax/data/prepare_shards.py) into
    ``<family>-<k>-of-<N>.array_record`` shards. Returns the family report's fields over these blocks (read,
    written, skipped, examples, shards, seconds; with ``shard=(0, 1)`` the whole family) plus ``n_blocks`` and
    the per-block counts ``blocks`` {k: {"written", "counts"}} that the merge adds up."""
    os.makedirs(out_dir, exist_ok=True)
    n = len(src)
    n_blocks = prepare_shards.num_blocks(n, records_per_shard)
    mine = prepare_shards.my_blocks(n_blocks, shard)
    todo = sum(min(n, (k + 1) * records_per_shard) - k * records_per_shard for k in mine)
    bar = tqdm(total=todo, desc=f"prepare {family} ({src.name}) {shard[0]}/{shard[1]}", unit="rec",
               disable=not progress)
    t0 = time.time()
    blocks = {}
    pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 0 else None
    window = max(1, workers) * 16  # records in flight: bounds memory, keeps the output order
    try:
        for k in mine:
            counter, written = SkipCounter(), 0
            path = os.path.join(out_dir, shard_name(family, k, n_blocks))
            writer = ArrayRecordWriter(path + ".tmp", WRITER_OPTIONS)
            stop = min(n, (k + 1) * records_per_shard)
            for start in range(k * records_per_shard, stop, window):
                idx = range(start, min(stop, start + window))
                if pool is not None:
                    results = pool.map(lambda i: _convert_index(src, i, proxy_task), idx)
                else:
                    results = (_convert_index(src, i, proxy_task) for i in idx)
                for canon, bad in results:
                    if bad is None:
                        counter.add_ok()
                        writer.write(pack_record(canon))
                        written += 1
                    else:
                        counter.add_skip(bad)
                    bar.update(1)
            writer.close()
            os.replace(path + ".tmp", path)  # a shard that exists is complete
            blocks[str(k)] = {"written": written, "counts": counter.as_dict()}
    finally:
        if pool is not None:
            pool.shutdown()
        bar.close()
    seconds = time.time() - t0
    out = prepare_shards.family_summary(src.name, "", {int(k): v for k, v in blocks.items()},
                                        [shard_name(family, k, n_blocks) for k in mine], seconds)
    return dict(out, n_blocks=n_blocks, blocks=blocks)


class PrepareError(ValueError):
    """A family wrote no sample at all (the CLI prints the one-line message and exits with status 1)."""


def check_written(report: dict) -> None:
    """Raises PrepareError naming each family that wrote 0 samples and its most frequent skip reasons."""
    empty = []
    for family, fam in report["families"].items():
        if fam["written"] == 0:
            top = sorted(((n, r) for r, n in fam["skipped"].items() if n), reverse=True)[:3]
            reasons = ", ".join(f"{r} {n}" for n, r in top) or "no records"
            first = next((fam["examples"][r][0] for _, r in top if fam["examples"].get(r)), "")
            empty.append(f"{family} ({fam['source']}) wrote 0 of {fam['read']} samples; top skip reasons: "
                         f"{reasons}" + (f" (first: {first})" if first else ""))
    if empty:
        raise PrepareError(f"prepare: {'; '.join(empty)}. Report: {report['workdir']}/{REPORT_NAME}")


def prepare(config, workdir: str, source: str | None = None, *, cache_latents=None) -> dict:
    """The prepare mode (see module doc). Returns the report it writes to ``<workdir>/prepare_report.json``
    (a shard that does not merge returns its part). ``cache_latents(config, workdir, shard)`` computes this
    shard's latents when ``config.data.latents == "cached"``; the mode (sgt_jax/train/prepare_latents.py)
    passes it, since the data package builds no model."""
    os.makedirs(workdir, exist_ok=True)
    index, count, mode = prepare_shards.parse_shard(config)
    if mode == "merge":
        report = prepare_shards.merge_reports(workdir, merge_latent_parts)
        if report is None:
            raise FileNotFoundError(f"prepare: {workdir!r} does not hold every part of a sharded prepare yet")
        return report
    shard = (index, count)
    if os.path.exists(os.path.join(workdir, REPORT_NAME)):
        raise FileExistsError(f"prepare: {os.path.join(workdir, REPORT_NAME)} exists; use an empty --workdir")
    srcs_cfg = config.data.sources
    per_shard = int(srcs_cfg.records_per_shard)
    workers = int(srcs_cfg.prepare_workers)
    proxy_task = config.data.proxy_task
    part = {"proxy_task": proxy_task, "source_root": source, "workdir": os.path.abspath(workdir), "shard": list(shard),
            "families": {}}
    builders = {"seg": sources_mod.build_seg_source, "vqa": sources_mod.build_vqa_source}
    for family, build in builders.items():
        kind = srcs_cfg[family].kind
        if kind in RAW_SKIP_KINDS:
            log.info("prepare: %s kind %r has nothing to convert; skipped", family, kind)
            continue
        src = build(config, root_override=source)
        n_blocks = prepare_shards.num_blocks(len(src), per_shard)
        for k in prepare_shards.my_blocks(n_blocks, shard):
            if os.path.exists(os.path.join(workdir, shard_name(family, k, n_blocks))):
                raise FileExistsError(f"prepare: {os.path.join(workdir, shard_name(family, k, n_blocks))} exists; "
                                      "use an empty --workdir")
        fam = prepare_family(src, workdir, family, proxy_task, per_shard, workers, shard=shard)
        fam["kind"] = kind
        part["families"][family] = fam  # this shard's counts (report-shaped) + the per-block counts to merge
        log.info("prepare %s (shard %d/%d): read %d, wrote %d in %d shards", family, index, count, fam["read"],
                 fam["written"], len(fam["blocks"]))
    if config.data.latents == "cached":
        if cache_latents is None:
            raise ValueError("config.data.latents='cached' needs the VAE: run --mode prepare (sgt_jax/train/"
                             "prepare_latents.py), or prepare with --config.data.latents=online")
        part["latents"] = cache_latents(config, workdir, shard)
    prepare_shards.write_json(os.path.join(workdir, prepare_shards.part_name(shard)), part)
    # one process, or "i/n" (whoever finds every part merges), or jax.distributed: process 0 after a barrier
    if mode == "jax":
        prepare_shards.barrier("sgt_prepare_parts_written")
    report = prepare_shards.merge_reports(workdir, merge_latent_parts) if mode != "jax" or index == 0 else None
    if mode == "jax":
        prepare_shards.barrier("sgt_prepare_merged")
    if report is None:
        log.info("prepare: shard %d/%d done; the last shard to finish (or --config.prepare.shard=merge) writes %s",
                 index, count, REPORT_NAME)
        return part
    for family, fam in report["families"].items():
        log.info("prepare %s: read %d, wrote %d, skipped %s", family, fam["read"], fam["written"],
                 {r: n for r, n in fam["skipped"].items() if n})
    return report
