"""Cached VAE latent statistics: the frozen FLUX VAE run once over the prepared targets (the pod-scale default).

At 1024 px the frozen VAE encoder costs more per step than it is worth re-running every epoch, so pod-scale
configs (``config.data.latents = "cached"``) read each target's posterior ``mean``/``logvar`` from here; the
train step then samples ``z = mean + exp(logvar/2)·eps`` and applies scale/shift, exactly as it does with
online statistics (docs/interfaces.md §1: ``latent_mean``/``latent_logvar`` are patchified
``[Z, p·p·zc]``, vector order (patch-row, patch-col, channel)).

Canvas rule: every target is encoded ALONE, at its own (VAE-transform) size. BAGEL's training loop instead
zero-pads all images of a pack to a shared canvas before encoding, so its border latents (and, through the
encoder's mid-block attention, all latents) of a smaller image depend on the padding. Online mode here
(``vae_images``, zero-padded to the ``(max, max)`` VAE canvas) reproduces BAGEL; the two agree exactly for
images that fill the canvas (tests/unit/test_latent_cache.py, fp32, atol 1e-5) and differ slightly for
smaller ones. Encoding alone is what BAGEL does at inference, so cached statistics are the cleaner target.

On disk (``config.data.latent_cache``): ``latents-NNNNN-of-NNNNN.array_record`` shards of msgpack records
``{"key", "grid": [h, w], "mean": f32 bytes, "logvar": f32 bytes}`` and ``latents_index.json`` with the key ->
(shard, row) map and what the statistics depend on (VAE transform, latent stride and dim, proxy task), which
:class:`LatentCache` checks against the run's config.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from sgt_jax.data import prepare_shards
from sgt_jax.data.arrayrecord_io import shard_name, unpack_record
from sgt_jax.data.bad_data import SkipCounter
from sgt_jax.data.plans import vae_target
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.common import decode_canonical
from sgt_jax.data.transforms import Transforms, latent_grid, normalize

log = logging.getLogger(__name__)
INDEX_NAME = "latents_index.json"
PART_STEM = "latents_index"
FORMAT_VERSION = 1


def _fingerprint(config) -> dict:
    """What cached statistics depend on besides the pixels and the VAE weights."""
    m = config.model
    return {"vae_transform": list(config.data.transforms.vae), "latent_patch_size": int(m.latent_patch_size),
            "z_channels": int(m.vae.z_channels), "ch_mult": list(m.vae.ch_mult),
            "proxy_task": config.data.proxy_task}


class LatentCache:
    """Read side: ``attach(plan)`` puts ``latent_mean``/``latent_logvar`` [n_gen, D] into a seg plan."""

    def __init__(self, path: str, config=None):
        self.path = path
        index_path = os.path.join(path, INDEX_NAME)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"no latent cache index {index_path!r}; build it with --mode prepare and "
                                    "config.data.latents='cached'")
        with open(index_path) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT_VERSION:
            raise ValueError(f"latent cache {path!r} has format {self.index.get('format')}, need {FORMAT_VERSION}")
        if config is not None:
            want, have = _fingerprint(config), self.index["fingerprint"]
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                raise ValueError(f"latent cache {path!r} was built for other settings (cache, config): {diff}")
        self.shards = [os.path.join(path, s) for s in self.index["shards"]]
        self._readers = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_readers"] = {}
        return d

    def _read(self, shard: int, row: int) -> dict:
        if shard not in self._readers:
            self._readers[shard] = ArrayRecordReader(self.shards[shard], "readahead_buffer_size:0")
        return msgpack.unpackb(self._readers[shard].read([row])[0], raw=False)

    def lookup(self, key: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        where = self.index["keys"].get(key)
        if where is None:
            raise BadSample("bad_record", f"{key}: no cached latents in {self.path!r}")
        rec = self._read(*where)
        if rec["key"] != key:
            raise ValueError(f"latent cache {self.path!r} is corrupt: row {where} holds {rec['key']!r}, not {key!r}")
        d = int(self.index["latent_dim"])
        mean = np.frombuffer(rec["mean"], np.float32).reshape(-1, d)
        logvar = np.frombuffer(rec["logvar"], np.float32).reshape(-1, d)
        return mean, logvar, tuple(rec["grid"])

    def attach(self, plan: dict) -> dict:
        if plan["n_gen"] == 0:
            return plan
        mean, logvar, grid = self.lookup(plan["key"])
        rc = plan["latent_rc"]
        want = (int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1)
        if grid != want or mean.shape[0] != plan["n_gen"]:
            raise ValueError(f"{plan['key']}: cached latent grid {grid} != the plan's {want}: the cache was built "
                             "from other images or settings")
        plan["latent_mean"], plan["latent_logvar"] = mean, logvar
        return plan


def _blocks(config, workdir: str, source, records_per_shard: int):
    """``(n_blocks, read)``: ``read(k)`` yields the raw records of block ``k`` and ``decode`` their samples.
    Without ``source``: block k = prepared seg shard k of ``workdir`` (so latents-k belongs to seg-k); else
    records ``[k·R, (k+1)·R)`` of ``source``."""
    if source is not None:
        n = len(source)

        def read(k):
            return (source[i] for i in range(k * records_per_shard, min(n, (k + 1) * records_per_shard)))

        return prepare_shards.num_blocks(n, records_per_shard), read, source.decode
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "seg-*-of-*.array_record")))
    totals = {int(name.split("-of-")[1].split(".")[0]) for name in names}
    if len(totals) != 1:
        raise FileNotFoundError(f"latent cache: no single set of prepared seg shards in {workdir!r}: {names[:5]}")
    n_blocks = totals.pop()
    proxy, seed = config.data.proxy_task, int(config.data.seed)
    mismatch = str(config.data.mask_size_mismatch)  # the same samples as training reads

    def read(k):
        path = os.path.join(workdir, shard_name("seg", k, n_blocks))
        if not os.path.exists(path):
            raise FileNotFoundError(f"latent cache: {path!r} is missing (prepare this shard's seg blocks first)")
        reader = ArrayRecordReader(path)
        try:
            for j in range(reader.num_records()):
                yield reader.read([j])[0]
        finally:
            reader.close()

    return n_blocks, read, lambda raw: decode_canonical(unpack_record(raw), proxy, seed, mismatch)


def cache_latents(config, workdir: str, *, encode, source=None, out_dir: str | None = None,
                  batch_size: int = 8, records_per_shard: int = 4096, shard: tuple[int, int] = (0, 1),
                  merge: bool = True) -> dict:
    """Encodes the segmentation-family targets of this shard's blocks (:func:`_blocks`; default: the prepared
    seg shards in ``workdir``) into ``latents-<k>-of-<N>.array_record`` in ``out_dir`` (default ``workdir``),
    leaving the per-block keys and skip counts in ``latents_index.part-<i>-of-<n>.json``. With ``merge`` (and
    every part present) it then writes ``latents_index.json`` and returns the report; else it returns the part.

    ``encode``: ``images [B,H,W,3] in [-1,1] -> (mean, logvar)`` as numpy, patchified to [B, h·w, p·p·zc]
    (``sgt_jax.models.flux_vae.make_stats_encoder``, data parallel over the local devices; the prepare mode
    builds it, sgt_jax/train/prepare_latents.py). Images of equal size within a block are encoded together,
    ``batch_size`` at a time. Batches never span blocks, so the statistics do not depend on how many
    shards ran. Bad samples are skipped and counted.
    """
    out_dir = out_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    n_blocks, read, decode = _blocks(config, workdir, source, records_per_shard)
    mine = prepare_shards.my_blocks(n_blocks, shard)
    stale = [os.path.join(out_dir, INDEX_NAME)] + [os.path.join(out_dir, _shard_name(k, n_blocks)) for k in mine]
    for path in stale:
        if os.path.exists(path):
            raise FileExistsError(f"latent cache {path!r} exists; remove it or use another folder")
    tfm = Transforms.from_config(config)
    latent_dim = int(config.model.latent_patch_size) ** 2 * int(config.model.vae.z_channels)
    blocks = {}
    for k in mine:
        counter, keys, pending = SkipCounter(), {}, []
        path = os.path.join(out_dir, _shard_name(k, n_blocks))
        writer = ArrayRecordWriter(path + ".tmp", "group_size:1")

        def flush():
            if not pending:
                return
            means, logvars = encode(np.stack([normalize(img) for _, img in pending]))
            for (key, img), m, lv in zip(pending, means, logvars):
                grid = latent_grid(*img.shape[:2], tfm.latent_stride)
                writer.write(msgpack.packb({"key": key, "grid": list(grid), "mean": m.astype(np.float32).tobytes(),
                                            "logvar": lv.astype(np.float32).tobytes()}, use_bin_type=True))
                keys[key] = len(keys)
            pending.clear()

        for raw in read(k):
            sample = counter.call(decode, raw)
            if sample is None:
                continue
            if sample["key"] in keys or any(key == sample["key"] for key, _ in pending):
                raise ValueError(f"duplicate sample key {sample['key']!r} in the seg source: keys must be unique")
            img = vae_target(sample, tfm)
            if pending and (pending[0][1].shape != img.shape or len(pending) >= batch_size):
                flush()
            pending.append((sample["key"], img))
        flush()
        writer.close()
        os.replace(path + ".tmp", path)
        blocks[str(k)] = {"keys": keys, "counts": counter.as_dict()}
    part = {"n_blocks": n_blocks, "latent_dim": latent_dim, "fingerprint": _fingerprint(config), "blocks": blocks}
    prepare_shards.write_json(os.path.join(out_dir, prepare_shards.part_name(shard, PART_STEM)), part, indent=None)
    summary = {"blocks": len(blocks), "written": sum(len(b["keys"]) for b in blocks.values())}
    if merge:
        report = merge_latent_parts(out_dir)
        if report is not None:
            return report
    return summary


def _shard_name(k: int, n: int) -> str:
    return f"latents-{k:05d}-of-{n:05d}.array_record"


def merge_latent_parts(out_dir: str) -> dict | None:
    """Writes ``latents_index.json`` from the parts in ``out_dir`` (None while parts are missing); returns the
    report ``{"written", "shards", "skipped"}``."""
    parts = prepare_shards.read_parts(out_dir, PART_STEM)
    if parts is None:
        return None
    blocks = prepare_shards.gather_blocks(parts, lambda p: p["blocks"])
    n = parts[0]["n_blocks"]
    if sorted(blocks) != list(range(n)):
        raise ValueError(f"latent cache parts in {out_dir!r} cover blocks {sorted(blocks)[:10]}..., not 0..{n - 1}")
    keys, counter = {}, SkipCounter(log_skips=False)
    for k in range(n):
        counter.merge(blocks[k]["counts"])
        for key, row in blocks[k]["keys"].items():
            if key in keys:
                raise ValueError(f"duplicate sample key {key!r} in the seg source: keys must be unique")
            keys[key] = [k, row]
    index = {"format": FORMAT_VERSION, "latent_dim": parts[0]["latent_dim"], "fingerprint": parts[0]["fingerprint"],
             "shards": [_shard_name(k, n) for k in range(n)], "keys": keys}
    prepare_shards.write_json(os.path.join(out_dir, INDEX_NAME), index, indent=None)
    report = {"written": len(keys), "shards": n, "skipped": counter.as_dict()["skipped"]}
    log.info("latent cache: %s", report)
    return report
