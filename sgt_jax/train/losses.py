"""Flow-matching inputs and the SGT losses (ByteDance-Seed/Bagel `modeling/bagel/bagel.py` `forward`, `train/pretrain_unified_navit.py`).

* Clean latents ``x0``: the VAE posterior is SAMPLED (``mean + exp(logvar/2)·N(0,1)``) and then scaled
  (``scale·(z − shift)``), from cached statistics (``latent_mean``/``latent_logvar``) or from an online
  encode of ``vae_images`` by the frozen VAE (gradient stopped).
* Timesteps: one logit ``n ~ N(0,1)`` per VAE image slot, ``t = sigmoid(n)``, shifted
  ``t <- s·t / (1 + (s−1)·t)``; every target token of the image gets its image's ``t``; clean
  conditions and padding get ``t = 0``. Noise ``ε`` is drawn per token. ``x_t = (1−t)·x0 + t·ε``,
  target velocity ``v = ε − x0``.
* CE: a GLOBAL per-token mean over valid labels (the step runs on global arrays, so the sums already
  span all devices); the LM head runs on chunks of ``config.train.ce_chunk`` labels under remat, so
  ``[L, V]`` logits never exist beyond one chunk, in the forward or the backward pass.
* MSE: per-token mean over the latent channels, then a global mean over target tokens.
* ``loss = ce_weight·CE + mse_weight·MSE``; a term with no tokens in the global batch contributes 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgt_jax.models.flux_vae import patchify_latent
from sgt_jax.models.layers import constrain


def shift_timesteps(t, shift: float):
    """BAGEL's timestep shift ``s·t / (1 + (s − 1)·t)`` (identity for s = 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def scale_latents(z, vae_cfg):
    return float(vae_cfg.scale_factor) * (z - float(vae_cfg.shift_factor))


def flow_noise(key, batch, *, model_cfg, num_images: int) -> dict:
    """Every random draw of the flow-matching inputs for the whole ``batch``, each with the pack axis first:
    ``post`` (posterior sample noise: ``[B, Z, D]`` for cached statistics, ``[B, NI, h, w, C]`` on the VAE
    latent grid for online encoding), ``t_logit`` ``[B, NI]`` and ``eps`` ``[B, Z, D]``.

    Drawn once per step and then sliced by pack, so a step split into micro-batches
    (``config.train.microbatches``) draws exactly the numbers the whole batch would."""
    k_post, k_t, k_eps = jax.random.split(key, 3)
    b, z = batch["latent_image"].shape
    vae_cfg = model_cfg.vae
    d = int(vae_cfg.z_channels) * int(model_cfg.latent_patch_size) ** 2
    if "latent_mean" in batch:
        post = jax.random.normal(k_post, batch["latent_mean"].shape, jnp.float32)
    elif "vae_images" in batch:
        _, ni, hc, wc, _ = batch["vae_images"].shape
        if ni != num_images:
            raise ValueError(f"vae_images has {ni} slots, config says {num_images}")
        down = 2 ** (len(vae_cfg.ch_mult) - 1)
        shape = (b * ni, hc // down, wc // down, int(vae_cfg.z_channels))
        post = jax.random.normal(k_post, shape, jnp.float32).reshape((b, ni) + shape[1:])
    else:
        raise ValueError("batch has neither cached latent statistics (latent_mean/latent_logvar) nor vae_images")
    return dict(post=post, t_logit=jax.random.normal(k_t, (b, num_images), jnp.float32),
                eps=jax.random.normal(k_eps, (b, z, d), jnp.float32))


def clean_latents_cached(batch, post_noise, vae_cfg):
    """x0 [B, Z, D] from cached patchified posterior statistics: sample (with ``post_noise``), then scale."""
    mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    return scale_latents(mean + jnp.exp(0.5 * logvar) * post_noise, vae_cfg)


def clean_latents_online(batch, post_noise, vae, vae_cfg, latent_patch: int):
    """x0 [B, Z, D] from ``vae_images`` [B, NI, Hc, Wc, 3]: encode (frozen), sample (``post_noise``
    [B, NI, h, w, C]), scale, patchify, then gather each latent row's token by (image slot, latent_rc)."""
    images = batch["vae_images"]
    b, ni, hc, wc, _ = images.shape
    images = constrain(images.reshape(b * ni, hc, wc, images.shape[-1]), ("batch", None, None, None))
    mean, logvar = vae.encode_stats(images)
    mean, logvar = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar)
    z = mean + jnp.exp(0.5 * logvar) * post_noise.reshape(mean.shape)
    z = scale_latents(z, vae_cfg)
    grid_w = z.shape[2] // latent_patch
    tokens = patchify_latent(z, latent_patch)  # [B*NI, gh*gw, D]
    tokens = tokens.reshape(b, ni * tokens.shape[1], tokens.shape[2])
    slot = jnp.clip(batch["latent_image"], 0, ni - 1)
    rc = batch["latent_rc"]
    index = slot * (tokens.shape[1] // ni) + rc[..., 0] * grid_w + rc[..., 1]
    return jnp.take_along_axis(tokens, index[..., None], axis=1)


def flow_inputs(batch, key, *, vae, model_cfg, shift: float, num_images: int, noise: dict | None = None):
    """``(x_t, t, v_target)`` for the latent stream. ``num_images`` = NI, the VAE image slots per pack
    (``config.data.pack.vae_images``). Rows that are not targets have t = 0 and x_t = x0; pad rows are 0.
    ``noise`` (from ``flow_noise``) replaces the draws from ``key``."""
    if noise is None:
        noise = flow_noise(key, batch, model_cfg=model_cfg, num_images=num_images)
    if "latent_mean" in batch:
        x0 = clean_latents_cached(batch, noise["post"], model_cfg.vae)
    else:
        if vae is None:
            raise ValueError("online latents (vae_images in the batch) need a model built with its VAE")
        x0 = clean_latents_online(batch, noise["post"], vae, model_cfg.vae, int(model_cfg.latent_patch_size))
    image = batch["latent_image"]
    real = image >= 0
    x0 = jnp.where(real[..., None], x0, 0.0)
    t_img = shift_timesteps(jax.nn.sigmoid(noise["t_logit"]), shift)
    t = jnp.take_along_axis(t_img, jnp.clip(image, 0, num_images - 1), axis=1)
    t = jnp.where(batch["latent_target"] & real, t, 0.0)
    eps = noise["eps"]
    x_t = constrain((1.0 - t[..., None]) * x0 + t[..., None] * eps, ("batch", "seq", None))
    return x_t, t, eps - x0


def chunked_ce_sum(model, hidden, labels, valid, chunk: int):
    """Sum over valid labels of ``logsumexp(logits) − logits[label]``, computing the LM head on chunks
    of ``chunk`` labels (rematerialised in the backward pass) -> (sum, count)."""
    b, length, h = hidden.shape
    chunk = max(1, min(int(chunk), length))
    pad = (-length) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk
    hs = hidden.reshape(b, n, chunk, h).swapaxes(0, 1)
    ls = labels.reshape(b, n, chunk).swapaxes(0, 1)
    vs = valid.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h_c, l_c, v_c):
        logits = model.lm_logits(h_c).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, l_c[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(v_c, lse - picked, 0.0))

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ls, vs))
    return total, jnp.sum(valid.astype(jnp.float32))


def token_counts(batch):
    """``(n_ce, n_mse)``: valid CE labels and latent target tokens of ``batch`` (the loss normalisers)."""
    target = batch["latent_target"] & (batch["latent_image"] >= 0)
    return jnp.sum(batch["ce_valid"].astype(jnp.float32)), jnp.sum(target.astype(jnp.float32))


def sgt_loss(model, batch, key, train_cfg, model_cfg, num_images: int, *, noise: dict | None = None,
             counts: tuple | None = None):
    """The SGT objective on one (global) batch -> (loss, aux dict of scalars).

    ``noise`` (``flow_noise``) and ``counts`` (``token_counts``) of a larger batch make this the share of
    one micro-batch in that batch's loss: the per-token sums are divided by the whole batch's counts, so
    the micro-batch losses, gradients and ``aux`` ``ce``/``mse`` add up to the whole batch's."""
    x_t, t, v_target = flow_inputs(batch, key, vae=getattr(model, "vae", None), model_cfg=model_cfg,
                                   shift=float(train_cfg.timestep_shift), num_images=num_images, noise=noise)
    ce_hidden, velocity = model.forward(batch, x_t, t)
    ce_sum, n_ce = chunked_ce_sum(model, ce_hidden, batch["ce_label"], batch["ce_valid"], train_cfg.ce_chunk)
    target = batch["latent_target"] & (batch["latent_image"] >= 0)
    per_token = jnp.mean(jnp.square(velocity.astype(jnp.float32) - v_target), axis=-1)
    mse_sum = jnp.sum(jnp.where(target, per_token, 0.0))
    n_mse = jnp.sum(target.astype(jnp.float32))
    if counts is not None:
        n_ce, n_mse = counts
    ce = ce_sum / jnp.maximum(n_ce, 1.0)
    mse = mse_sum / jnp.maximum(n_mse, 1.0)
    loss = float(train_cfg.ce_weight) * ce + float(train_cfg.mse_weight) * mse
    return loss, dict(ce=ce, mse=mse, n_ce=n_ce, n_mse=n_mse)
