"""``--mode prepare``: the data shards (sgt_jax/data/prepare.py), then, for ``config.data.latents == "cached"``,
the VAE posterior statistics of their targets (sgt_jax/data/latent_cache.py).

The latent step runs the frozen FLUX VAE of ``config.checkpoint.init_from`` (a BAGEL folder with
``ae.safetensors``), so it lives here, above the data package, which builds no model.
"""

from __future__ import annotations

from sgt_jax.checkpoint.convert import load_vae
from sgt_jax.data import latent_cache
from sgt_jax.data.prepare import check_written, prepare, write_report
from sgt_jax.mode_args import ModeArgs
from sgt_jax.models.flux_vae import make_stats_encoder


def run(config, args: ModeArgs) -> None:
    """The CLI entry (sgt_jax/main.py): ``args.workdir`` and ``args.source``. Returns None (absl would print
    and exit 1 on a returned value); raises PrepareError (exit status 1) when a family wrote nothing."""
    prepare_all(config, args.workdir, args.source)


def prepare_all(config, workdir: str, source: str | None = None) -> dict:
    """Shards, then cached latents if configured; returns the report written to ``prepare_report.json``.
    A family that wrote nothing is an error (``PrepareError``) before any latent is computed."""
    report = prepare(config, workdir, source)
    check_written(report)
    if config.data.latents == "cached":
        vae = load_vae(config.checkpoint.init_from, config.model.vae)
        encode = make_stats_encoder(vae, int(config.model.latent_patch_size))
        report["latents"] = latent_cache.cache_latents(config, workdir, encode=encode)
        write_report(workdir, report)
    return report
