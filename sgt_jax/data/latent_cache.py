"""Cached VAE latent statistics: the frozen FLUX VAE run once over the prepared targets (design.md decision).

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

from sgt_jax.data.plans import vae_target
from sgt_jax.data.records import BadSample
from sgt_jax.data.transforms import Transforms, latent_grid, normalize

log = logging.getLogger(__name__)
INDEX_NAME = "latents_index.json"
FORMAT_VERSION = 1


def _fingerprint(config) -> dict:
    """What cached statistics depend on besides the pixels and the VAE weights."""
    m = config.model
    return {"vae_transform": list(config.data.transforms.vae), "latent_patch_size": int(m.latent_patch_size),
            "z_channels": int(m.vae.z_channels), "ch_mult": list(m.vae.ch_mult),
            "proxy_task": config.data.get("proxy_task", "segmentation")}


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
        from array_record.python.array_record_module import ArrayRecordReader

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


def make_encoder(vae, latent_patch_size: int):
    """jit-compiled ``images [B,H,W,3] in [-1,1] -> (mean, logvar)`` patchified to [B, h·w, p·p·zc]."""
    import jax
    from flax import nnx

    from sgt_jax.models.flux_vae import patchify_latent

    graphdef, state = nnx.split(vae)

    @jax.jit
    def encode(st, x):
        mean, logvar = nnx.merge(graphdef, st).encode_stats(x)
        return patchify_latent(mean, latent_patch_size), patchify_latent(logvar, latent_patch_size)

    return lambda x: tuple(np.asarray(a) for a in encode(state, x))


def load_vae(config):
    """The frozen FLUX VAE with weights from ``config.checkpoint.init_from`` (a BAGEL folder: ae.safetensors).

    Built abstractly (``nnx.eval_shape``) and filled from the file, so no random init runs."""
    import jax.numpy as jnp
    from flax import nnx
    from safetensors import safe_open

    from sgt_jax.checkpoint.convert import vae_state_dict_to_params
    from sgt_jax.models.flux_vae import FluxVAE

    folder = config.checkpoint.get("init_from", "")
    path = os.path.join(folder, "ae.safetensors")
    if not folder or not os.path.exists(path):
        raise FileNotFoundError(f"caching latents needs the VAE weights: {path!r} not found (set "
                                "config.checkpoint.init_from to a BAGEL checkpoint folder)")
    with safe_open(path, framework="flax") as f:  # flax: bf16 files load too (numpy has no bfloat16)
        sd = {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
    params = vae_state_dict_to_params(sd, config.model.vae)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: FluxVAE(config.model.vae, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, _tree_map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def _tree_map(fn, tree):
    import jax

    return jax.tree.map(fn, tree)


def cache_latents(config, workdir: str, *, vae=None, source=None, out_dir: str | None = None,
                  batch_size: int = 8, records_per_shard: int = 4096) -> dict:
    """Encodes every segmentation-family target of ``source`` (default: the prepared seg shards in
    ``workdir``) and writes the cache to ``out_dir`` (default ``workdir``). Returns a report dict.

    Images of equal size are encoded together, ``batch_size`` at a time. Bad samples are skipped and counted.
    Single process: run it on one host (it reads everything once).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    from sgt_jax.data.bad_data import SkipCounter

    if source is None:
        from sgt_jax.data.sources import PreparedSource

        source = PreparedSource(workdir, "seg", proxy_task=config.data.get("proxy_task", "segmentation"),
                                seed=int(config.data.seed),
                                mask_size_mismatch=str(config.data.get("mask_size_mismatch", "skip")))
    out_dir = out_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "latents-*.array_record")) + [os.path.join(out_dir, INDEX_NAME)]:
        if os.path.exists(stale):
            raise FileExistsError(f"latent cache {stale!r} exists; remove it or use another folder")
    tfm = Transforms.from_config(config)
    encode = make_encoder(vae if vae is not None else load_vae(config), int(config.model.latent_patch_size))
    latent_dim = int(config.model.latent_patch_size) ** 2 * int(config.model.vae.z_channels)
    counter = SkipCounter()
    keys, shards, pending = {}, [], []
    state = {"writer": None, "rows": 0}

    def write(key, mean, logvar, grid):
        if state["writer"] is None or state["rows"] >= records_per_shard:
            if state["writer"] is not None:
                state["writer"].close()
            shards.append(f"latents-{len(shards):05d}.tmp")
            state["writer"] = ArrayRecordWriter(os.path.join(out_dir, shards[-1]), "group_size:1")
            state["rows"] = 0
        state["writer"].write(msgpack.packb({"key": key, "grid": list(grid), "mean": mean.tobytes(),
                                             "logvar": logvar.tobytes()}, use_bin_type=True))
        keys[key] = [len(shards) - 1, state["rows"]]
        state["rows"] += 1

    def flush():
        if not pending:
            return
        x = np.stack([normalize(img) for _, img in pending])
        means, logvars = encode(x)
        for (key, img), m, lv in zip(pending, means, logvars):
            write(key, m.astype(np.float32), lv.astype(np.float32), latent_grid(*img.shape[:2], tfm.latent_stride))
        pending.clear()

    for i in range(len(source)):
        sample = counter.call(source.decode, source[i])
        if sample is None:
            continue
        if sample["key"] in keys or any(k == sample["key"] for k, _ in pending):
            raise ValueError(f"duplicate sample key {sample['key']!r} in the seg source: keys must be unique")
        img = vae_target(sample, tfm)
        if pending and (pending[0][1].shape != img.shape or len(pending) >= batch_size):
            flush()
        pending.append((sample["key"], img))
    flush()
    if state["writer"] is not None:
        state["writer"].close()
    finals = []
    for j, tmp in enumerate(shards):
        final = f"latents-{j:05d}-of-{len(shards):05d}.array_record"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        finals.append(final)
    index = {"format": FORMAT_VERSION, "latent_dim": latent_dim, "fingerprint": _fingerprint(config),
             "shards": finals, "keys": keys}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump(index, f)
    report = {"written": len(keys), "shards": len(finals), "skipped": counter.as_dict()["skipped"]}
    log.info("latent cache: %s", report)
    return report
