"""``--mode prepare``: the data shards (sgt_jax/data/prepare.py), and, for ``config.data.latents == "cached"``,
the VAE posterior statistics of their targets (sgt_jax/data/latent_cache.py).

The latent step runs the frozen FLUX VAE of ``config.checkpoint.init_from`` (a BAGEL folder with
``ae.safetensors``), so the mode lives here, above the data package, which builds no model.
"""

from __future__ import annotations

from sgt_jax.checkpoint.convert import load_vae
from sgt_jax.data import latent_cache
from sgt_jax.data.prepare import check_written, prepare
from sgt_jax.mode_args import ModeArgs
from sgt_jax.models.flux_vae import make_stats_encoder


def run(config, args: ModeArgs) -> None:
    """The CLI entry (sgt_jax/main.py): ``args.workdir`` and ``args.source``. Returns None (absl would print
    and exit 1 on a returned value); raises PrepareError (exit status 1) when a family wrote nothing."""
    check_written(prepare_all(config, args.workdir, args.source))


def prepare_all(config, workdir: str, source: str | None = None) -> dict:
    """Shards, and cached latents if configured; returns the report (or this shard's part)."""
    return prepare(config, workdir, source, cache_latents=cache_shard_latents)


def cache_shard_latents(config, workdir: str, shard: tuple[int, int]) -> dict:
    """This shard's latents (its part of the latent index; the prepare merge joins the parts)."""
    vae = load_vae(config.checkpoint.init_from, config.model.vae)
    encode = make_stats_encoder(vae, int(config.model.latent_patch_size))
    return latent_cache.cache_latents(config, workdir, encode=encode, shard=shard, merge=False)
