"""OmniGen2's flow-matching training loss (official code: VectorSpaceLab/OmniGen2,
``omnigen2/transport/transport.py`` and ``path.py`` with ``options/ft.yml``: Linear path, velocity
prediction, ``snr_type=lognorm``, ``do_shift`` and ``dynamic_time_shift`` v1).

Convention: t = 1 is data. Per sample

* ``t = sigmoid(u)``, ``u ~ N(0, 1)`` (logit-normal);
* dynamic shift by the target's size: ``n`` = its number of patch tokens (H_lat/2 · W_lat/2),
  ``μ = 0.5 + (1.15 − 0.5)·(n − 256)/(4096 − 256)`` (a straight line, not clipped), and with
  ``σ = 1 − t``: ``σ' = e^μ·σ / (e^μ·σ + 1 − σ)``, ``t' = 1 − σ'``;
* ``t'`` is cast to the latents' dtype before anything uses it (bf16 in the official run:
  ``time_dtype``, default bfloat16 to reproduce it; ``"float32"`` keeps it exact);
* ``x_t = t'·x₁ + (1 − t')·x₀`` with ``x₀ ~ N(0, I)``; the target is ``x₁ − x₀``;
* loss = (sum over the batch of each sample's fp32 squared error summed over its latent elements) /
  (the number of latent elements in the batch): a per-element MSE over the whole batch, so larger
  images weigh more per sample (the official normalisation by the global element count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgt_jax.models import omnigen2_inputs as inputs


def shift_mu(num_patch_tokens):
    """``μ(n)`` of the dynamic time shift v1 (not clipped)."""
    n = jnp.asarray(num_patch_tokens, jnp.float32)
    return 0.5 + (1.15 - 0.5) * (n - 256.0) / (4096.0 - 256.0)


def shift_time(t, num_patch_tokens):
    """Apply the dynamic shift to ``t`` (t = 1 data): ``σ' = e^μ σ / (e^μ σ + 1 − σ)``, returns ``1 − σ'``."""
    s = jnp.exp(shift_mu(num_patch_tokens))
    sigma = 1.0 - t
    sigma = s * sigma / (s * sigma + 1.0 - sigma)
    return 1.0 - sigma


def time_from_normal(u, x_hw, time_dtype="bfloat16"):
    """``u ~ N(0, 1) [B]`` -> shifted logit-normal times ``[B]`` for token grids ``x_hw [B, 2]``, in ``time_dtype``."""
    t = shift_time(jax.nn.sigmoid(u), x_hw[:, 0] * x_hw[:, 1])
    return t.astype(time_dtype)


def sample_time(key, x_hw, time_dtype="bfloat16"):
    """Per-sample training times ``[B]`` for target token grids ``x_hw [B, 2]``, rounded to ``time_dtype``."""
    return time_from_normal(jax.random.normal(key, (x_hw.shape[0],), jnp.float32), x_hw, time_dtype)


def flow_loss(velocity_fn, x1, x_hw, key, *, time_dtype="bfloat16"):
    """The loss and its pieces for clean target tokens ``x1 [B, N, D]`` (padded, grids ``x_hw``).

    ``velocity_fn(x_t, t)`` is the model with its condition bound (e.g.
    ``lambda x, t: dit(x, x_hw, t, text, text_mask, refs, ref_hw)``). Padding tokens contribute nothing.
    Returns ``(loss, aux)`` with ``aux = {"t", "x_t", "target", "sse"}``."""
    k_t, k_x0 = jax.random.split(key)
    u = jax.random.normal(k_t, (x_hw.shape[0],), jnp.float32)
    return flow_terms(velocity_fn, x1, x_hw, u, jax.random.normal(k_x0, x1.shape, jnp.float32),
                      time_dtype=time_dtype)


def flow_terms(velocity_fn, x1, x_hw, u, x0, *, time_dtype="bfloat16"):
    """``flow_loss`` with its random draws given: ``u [B]`` (the normal behind t) and the noise ``x0``."""
    t = time_from_normal(u, x_hw, time_dtype)
    tf = t.astype(jnp.float32)[:, None, None]
    x_t = tf * x1 + (1.0 - tf) * x0
    target = x1 - x0
    v = velocity_fn(x_t.astype(x1.dtype), t)
    valid = inputs.grid_ids(x_hw, x1.shape[1])[2][..., None]  # [B, N, 1]
    err = jnp.where(valid, jnp.square(v.astype(jnp.float32) - target.astype(jnp.float32)), 0.0)
    sse = jnp.sum(err, axis=(1, 2))
    count = jnp.sum(valid) * x1.shape[-1]
    return jnp.sum(sse) / count, {"t": t, "x_t": x_t, "target": target, "sse": sse}
