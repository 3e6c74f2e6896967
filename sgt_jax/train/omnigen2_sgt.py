"""The SGT objective for OmniGen2 on a batch of rows (sgt_jax/data/omnigen2_plan.py): the step's loss hook.

    noise = draw_noise(key, batch, model_cfg)        # every random draw of the step, for the whole batch
    counts = token_counts(batch)                      # (CE labels, target latent elements) of the whole batch
    loss, aux = sgt_loss(model, batch, noise, counts, train_cfg, model_cfg)

One MLLM pass per row (tokens with the image spliced in by the vision tower) gives the last hidden states.
VQA rows: cross-entropy of the labelled positions (LM head in chunks, sgt_jax/train/losses.py
``chunked_ce_sum``). Segmentation rows: the frozen VAE encodes the target (posterior sample, shift and
scale; gradient stopped), and OmniGen2's flow loss (sgt_jax/train/omnigen2_loss.py: t = 1 is data,
logit-normal t with the resolution-dependent shift, target x1 - x0) trains the DiT on the hidden states,
whose gradient flows back into the MLLM (song2yu/SGT ``OmniGen2/train.py``).

``loss = ce_weight * CE_sum / n_ce + mse_weight * SSE / n_elements`` where n_ce and n_elements count the
WHOLE batch (``counts``), so micro-batch losses and gradients add up to the whole batch's. CE is a mean
over answer tokens (the reference's HF loss), the flow term a global per-element MSE (the reference's).
The reference weighs them implicitly (CE at ~1/60 of the flow loss): docs/omnigen2.md "Training".

The DiT path runs under ``lax.cond`` on "this micro-batch has a target row": the batch rows come in the
quota's pattern ([seg, seg, vqa], ...), so with ``train.microbatches`` a multiple of 3 every micro-batch is
single-task, as in the reference, and VQA micro-batches skip the DiT and the VAE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgt_jax.models.flux_vae import patchify_latent
from sgt_jax.models.qwen2_5_vl import VisionInputs
from sgt_jax.train.losses import chunked_ce_sum
from sgt_jax.train.omnigen2_loss import flow_terms


def _latent_geometry(batch, model_cfg):
    """(latent side of the canvas, DiT patch, channels, tokens per row)."""
    stride = 2 ** (len(model_cfg.vae.ch_mult) - 1)
    side = batch["target_images"].shape[1] // stride
    p, c = int(model_cfg.dit.patch_size), int(model_cfg.vae.z_channels)
    return side, p, c, (side // p) ** 2


def draw_noise(key, batch, model_cfg) -> dict:
    """``u [B]`` (the normal behind t), ``x0 [B, N, p·p·C]`` (flow noise), ``post [B, h, w, C]`` (VAE posterior)."""
    b = batch["tokens"].shape[0]
    side, p, c, n = _latent_geometry(batch, model_cfg)
    k_u, k_x0, k_post = jax.random.split(key, 3)
    return dict(u=jax.random.normal(k_u, (b,), jnp.float32),
                x0=jax.random.normal(k_x0, (b, n, p * p * c), jnp.float32),
                post=jax.random.normal(k_post, (b, side, side, c), jnp.float32))


def token_counts(batch):
    """``(n_ce, n_target)``: CE labels and target latent tokens of ``batch`` (the loss multiplies the
    tokens by their width p·p·C: the flow loss is a per-element mean)."""
    hw = batch["target_hw"]
    return jnp.sum(batch["ce_valid"].astype(jnp.float32)), jnp.sum((hw[:, 0] * hw[:, 1]).astype(jnp.float32))


def target_tokens(model, batch, post, model_cfg):
    """Clean DiT target tokens ``[B, N, p·p·C]`` in each target's row-major order (padding 0), from the
    frozen VAE (posterior sample with ``post``, then shift and scale)."""
    side, p, _, n = _latent_geometry(batch, model_cfg)
    mean, logvar = model.vae.encode_stats(batch["target_images"].astype(jnp.float32))
    z = jax.lax.stop_gradient(model.vae.scale(mean + jnp.exp(0.5 * logvar) * post))
    canvas = patchify_latent(z, p)  # [B, (side/p)², D], canvas row-major
    hw = batch["target_hw"]
    i = jnp.arange(n)[None, :]
    w = jnp.maximum(hw[:, 1:2], 1)
    src = (i // w) * (side // p) + i % w
    valid = i < hw[:, 0:1] * hw[:, 1:2]
    tokens = jnp.take_along_axis(canvas, jnp.where(valid, src, 0)[..., None], axis=1)
    return jnp.where(valid[..., None], tokens, 0.0)


def mllm_hidden(model, batch, model_cfg):
    """The MLLM's last hidden states ``[B, T, H]`` for the rows' tokens, images spliced in."""
    b = batch["tokens"].shape[0]
    merge = int(model_cfg.mllm.vision.spatial_merge_size)
    per_row = batch["vit_patches"].shape[1] // (merge * merge)
    index = batch["vision_index"]
    index = jnp.where(index >= 0, index + jnp.arange(b, dtype=index.dtype)[:, None] * per_row, -1)
    vision = VisionInputs(batch["vit_patches"], batch["vit_image"], batch["vit_window"], batch["vit_hw"])
    positions = jnp.moveaxis(batch["mrope"], 1, 0)  # [3, B, T]
    return model.condition(batch["tokens"], positions, batch["doc"], vision=vision, vision_index=index)


def sgt_loss(model, batch, noise: dict, counts, train_cfg, model_cfg):
    """-> ``(loss, aux)`` with aux ``ce``, ``mse`` (this batch's shares of the whole batch's means), ``n_ce``, ``n_mse``."""
    hidden = mllm_hidden(model, batch, model_cfg)
    ce_hidden = jnp.take_along_axis(hidden, batch["ce_pos"][..., None], axis=1)
    ce_sum, _ = chunked_ce_sum(model, ce_hidden, batch["ce_label"], batch["ce_valid"], int(train_cfg.ce_chunk))
    hw = batch["target_hw"]
    time_dtype = str(model_cfg.time_dtype)

    def flow(hidden):
        x1 = target_tokens(model, batch, noise["post"], model_cfg)
        velocity = lambda x_t, t: model.velocity(x_t, hw, t, hidden, batch["doc"] >= 0)  # noqa: E731
        _, aux = flow_terms(velocity, x1, hw, noise["u"], noise["x0"], time_dtype=time_dtype)
        return jnp.sum(aux["sse"])

    sse = jax.lax.cond(jnp.any(hw[:, 0] > 0), flow, lambda h: jnp.zeros((), jnp.float32), hidden)
    n_ce, n_tok = counts
    n_mse = n_tok * noise["x0"].shape[-1]
    ce = ce_sum / jnp.maximum(n_ce, 1.0)
    mse = sse / jnp.maximum(n_mse, 1.0)
    loss = float(train_cfg.ce_weight) * ce + float(train_cfg.mse_weight) * mse
    return loss, dict(ce=ce, mse=mse, n_ce=n_ce, n_mse=n_mse)
