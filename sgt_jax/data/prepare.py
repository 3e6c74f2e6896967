"""``--mode prepare``: raw data -> ArrayRecord shards of canonical records (+ cached VAE latents if configured).

    python -m sgt_jax.main --mode prepare --config configs/bagel_sgt.py:7b --source /data/raw --workdir /data/prep

* For each family (seg, then vqa) whose ``config.data.sources.<family>.kind`` is a raw kind, every record is
  read, converted to its canonical form (SA-1B/COCO targets rendered once to PNG; JPEG bytes kept as they
  are) and fully decoded once to check it (with ``config.data.proxy_task``); bad samples are skipped and
  counted by reason, never written.
* ``--source`` replaces ``sources.seg.root`` and ``sources.vqa.root`` (omit it and set both in the config when
  the two live in different places). Kinds ``synthetic`` are materialised too (handy for tests and demos);
  kind ``prepared`` and ``none`` are skipped.
* Output in ``--workdir``: ``seg-NNNNN-of-NNNNN.array_record``, ``vqa-...``, and ``prepare_report.json`` with
  counts read / written / skipped by reason (and the first few details of each reason) per family. When a
  family writes 0 samples, the CLI exits with status 1 and one line naming it and its top skip reasons. Train on
  them with ``--config.data.sources.seg.kind=prepared --config.data.sources.seg.root=<workdir>`` (same for vqa).
* ``config.data.sources.prepare_workers`` > 0 decodes in that many threads (order is kept; Pillow's JPEG/PNG
  codecs and zlib release the GIL, so threads scale on the image work without process start-up cost).
* If ``config.data.latents == "cached"``, ``sgt_jax.data.latent_cache.cache_latents(config, workdir)``
  (sgt_jax/data/latent_cache.py) then stores the targets' VAE posterior statistics.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import time

from tqdm import tqdm

from sgt_jax.data import sources as sources_mod
from sgt_jax.data.arrayrecord_io import ShardedWriter
from sgt_jax.data.bad_data import SkipCounter
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.common import decode_canonical

log = logging.getLogger(__name__)
REPORT_NAME = "prepare_report.json"
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
                   workers: int = 0, progress: bool = True) -> dict:
    """Converts every record of ``src`` into ``<family>-*.array_record`` shards; returns the family report."""
    counter = SkipCounter()
    writer = ShardedWriter(out_dir, family, records_per_shard)
    n = len(src)
    bar = tqdm(total=n, desc=f"prepare {family} ({src.name})", unit="rec", disable=not progress)
    t0 = time.time()
    try:
        pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 0 else None
        window = max(1, workers) * 16  # records in flight: bounds memory, keeps the output order
        for start in range(0, n, window):
            idx = range(start, min(n, start + window))
            if pool is not None:
                results = pool.map(lambda i: _convert_index(src, i, proxy_task), idx)
            else:
                results = (_convert_index(src, i, proxy_task) for i in idx)
            for canon, bad in results:
                if bad is None:
                    counter.add_ok()
                    writer.write(canon)
                else:
                    counter.add_skip(bad)
                bar.update(1)
        if pool is not None:
            pool.shutdown()
    finally:
        bar.close()
        shards = writer.close()
    counts = counter.as_dict()
    return {"source": src.name, "read": counts["seen"], "written": writer.count,
            "skipped": counts["skipped"], "skipped_total": counter.total_skipped, "examples": counts["examples"],
            "shards": [os.path.basename(s) for s in shards], "seconds": round(time.time() - t0, 3)}


def _cache_latents(config, workdir: str):
    """Calls engineer D2's latent cache builder on the freshly written shards."""
    try:
        from sgt_jax.data.latent_cache import cache_latents
    except ImportError as err:
        raise RuntimeError("config.data.latents == 'cached' but sgt_jax.data.latent_cache.cache_latents is not "
                           f"available ({err}); prepare with --config.data.latents=online to skip latents") from None
    return cache_latents(config, workdir)


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


def run(config, args) -> None:
    """The CLI entry (sgt_jax/main.py): ``args.workdir`` and ``args.source`` (ModeArgs). Returns None (absl
    would print and exit 1 on a returned value); raises PrepareError (exit status 1) when a family wrote
    nothing."""
    check_written(prepare(config, args.workdir, args.source))


def prepare(config, workdir: str, source: str | None = None) -> dict:
    """The prepare mode (see module doc). Returns the report it writes to ``<workdir>/prepare_report.json``."""
    os.makedirs(workdir, exist_ok=True)
    srcs_cfg = config.data.sources
    per_shard = int(srcs_cfg.get("records_per_shard", 2048))
    workers = int(srcs_cfg.get("prepare_workers", 0))
    proxy_task = config.data.get("proxy_task", "segmentation")
    report = {"proxy_task": proxy_task, "source_root": source, "workdir": os.path.abspath(workdir),
              "families": {}}
    builders = {"seg": sources_mod.build_seg_source, "vqa": sources_mod.build_vqa_source}
    for family, build in builders.items():
        kind = srcs_cfg[family].kind
        if kind in RAW_SKIP_KINDS:
            log.info("prepare: %s kind %r has nothing to convert; skipped", family, kind)
            continue
        for stale in (f for f in os.listdir(workdir) if f.startswith(f"{family}-") and f.endswith(".array_record")):
            raise FileExistsError(f"prepare: {os.path.join(workdir, stale)} exists; use an empty --workdir")
        src = build(config, root_override=source)
        fam = prepare_family(src, workdir, family, proxy_task, per_shard, workers)
        fam["kind"] = kind
        report["families"][family] = fam
        log.info("prepare %s: read %d, wrote %d, skipped %s", family, fam["read"], fam["written"],
                 {r: n for r, n in fam["skipped"].items() if n})
    if config.data.get("latents", "online") == "cached" or config.data.get("cache_latents", False):
        report["latents"] = _cache_latents(config, workdir)
    with open(os.path.join(workdir, REPORT_NAME), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    return report
