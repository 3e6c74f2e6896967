"""What the OmniGen2 diffusion transformer is fed: Omni-RoPE position ids and tables, latent packing,
and the condition taken from the MLLM's hidden states.

Omni-RoPE (OmniGen2, arXiv 2506.18871; official code VectorSpaceLab/OmniGen2,
``omnigen2/models/transformers/repo.py``): every token has three position ids, one per rotary axis,
``[sequence/modality id | row | column]``.

* text token n (n-th valid token): ``(n, n, n)``;
* reference image r (token grid ``h_r x w_r``): axis 0 is the constant ``shift_r``, axes 1/2 the row and
  column inside that image, starting at 0; ``shift_0 = cap`` (the number of valid text tokens) and
  ``shift_{r+1} = shift_r + max(h_r, w_r)``;
* the noisy target: axis 0 = the shift after the last reference image, axes 1/2 its own row/column.

The rotary tables are per axis, ``e^{i·pos·ω_k}`` with ``ω_k = θ^(-2k/d_a)`` for the axis' ``d_a``
real dims. The official code builds them in float64 (complex128); angles pos·ω up to ~10⁴ rad lose
~1e-3 rad in fp32, so here the cos/sin tables are computed in float64 with numpy and only then rounded
to fp32 (``rope_tables``), and gathered by id inside the model.

Static shapes: images are held as padded token arrays. A batch of target latents becomes
``tokens [B, N, p·p·C]`` (row-major over the token grid, each vector in (p1, p2, c) order with c fastest,
the official order, which is ``flux_vae.patchify_latent``'s) with their token grids ``hw [B, 2]``;
reference images ``[B, R, M, p·p·C]`` with ``hw [B, R, 2]`` (``(0, 0)`` = no image in that slot).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.models.flux_vae import patchify_latent, unpatchify_latent

# ---- rotary tables and application --------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def rope_tables(axes_dim: tuple[int, ...], axes_lens: tuple[int, ...], theta: float = 10000.0):
    """Per axis ``(cos, sin)`` fp32 numpy tables ``[axes_lens[a], axes_dim[a] // 2]`` (float64 math)."""
    out = []
    for d, n in zip(axes_dim, axes_lens):
        if d % 2:
            raise ValueError(f"axes_dim_rope entries must be even, got {list(axes_dim)}")
        omega = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d)
        ang = np.arange(n, dtype=np.float64)[:, None] * omega[None, :]
        out.append((np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)))
    return out


def rope_cos_sin(ids: jax.Array, tables) -> tuple[jax.Array, jax.Array]:
    """Position ids ``[..., 3]`` -> fp32 ``cos, sin [..., head_dim/2]`` (axes concatenated in order)."""
    cos, sin = [], []
    for a, (c, s) in enumerate(tables):
        idx = jnp.clip(ids[..., a], 0, c.shape[0] - 1)
        cos.append(jnp.take(jnp.asarray(c), idx, axis=0))
        sin.append(jnp.take(jnp.asarray(s), idx, axis=0))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` as complex numbers by ``cos + i·sin``.

    ``x [B, T, heads, D]``, ``cos/sin [B, T, D/2]`` (fp32); the product runs in fp32 and is cast back.
    This is the official ``apply_rotary_emb(use_real=False)`` (pairs are interleaved, not half-split)."""
    b, t, h, d = x.shape
    xr = x.astype(jnp.float32).reshape(b, t, h, d // 2, 2)
    re, im = xr[..., 0], xr[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(b, t, h, d).astype(x.dtype)


# ---- position ids ---------------------------------------------------------------------------------


def grid_ids(hw: jax.Array, n: int):
    """Row and column of tokens ``0..n-1`` in a row-major grid ``hw [..., 2]`` -> ``[..., n]`` each, and the
    validity ``[..., n]`` (token index < h·w)."""
    j = jnp.arange(n, dtype=jnp.int32)
    w = jnp.maximum(hw[..., 1:2], 1)
    valid = j < (hw[..., 0:1] * hw[..., 1:2])
    return j // w, j % w, valid


def omni_rope_ids(text_mask: jax.Array, x_hw: jax.Array, num_x: int, ref_hw: jax.Array | None = None,
                  num_ref: int = 0):
    """Omni-RoPE ids for text ``[B, L, 3]``, reference images ``[B, R, M, 3]`` and target ``[B, N, 3]``.

    ``text_mask [B, L]``: valid text tokens (the n-th valid token gets id n, so right padding gives the
    official ids; any other mask acts as if the text were compacted to the left). ``x_hw [B, 2]``:
    the target's token grid; ``ref_hw [B, R, 2]`` the reference grids (``(0, 0)`` = absent). ``num_x``
    (N) and ``num_ref`` (M) are the padded token counts. Ids of padding tokens are unspecified.
    """
    text_mask = text_mask.astype(jnp.int32)
    cap = jnp.sum(text_mask, axis=1)  # [B]
    n_text = jnp.cumsum(text_mask, axis=1) - 1
    text_ids = jnp.stack([n_text] * 3, axis=-1)
    shift = cap
    ref_ids = None
    if ref_hw is not None:
        row, col, _ = grid_ids(ref_hw, num_ref)  # [B, R, M]
        sizes = jnp.max(ref_hw, axis=-1)  # [B, R]
        starts = shift[:, None] + jnp.cumsum(sizes, axis=1) - sizes
        ref_ids = jnp.stack([jnp.broadcast_to(starts[..., None], row.shape), row, col], axis=-1)
        shift = shift + jnp.sum(sizes, axis=1)
    row, col, _ = grid_ids(x_hw, num_x)
    x_ids = jnp.stack([jnp.broadcast_to(shift[:, None], row.shape), row, col], axis=-1)
    return text_ids, ref_ids, x_ids


def check_rope_range(axes_lens: Sequence[int], text_mask, x_hw, ref_hw=None) -> None:
    """Host-side check (numpy inputs) that every Omni-RoPE id fits the rotary tables, like the range check
    of the SGT fork's ``repo.py``; inside the jitted model ids are clipped to the tables instead."""
    text_ids, ref_ids, x_ids = omni_rope_ids(jnp.asarray(text_mask), jnp.asarray(x_hw), 1,
                                             None if ref_hw is None else jnp.asarray(ref_hw), 1)
    cap = np.asarray(text_mask).astype(bool).sum(axis=1)
    x_hw = np.asarray(x_hw)
    worst = [int(np.max(x_ids[..., 0])), max(int(cap.max()) - 1, int(x_hw[:, 0].max()) - 1),
             max(int(cap.max()) - 1, int(x_hw[:, 1].max()) - 1)]
    if ref_hw is not None:
        ref_hw = np.asarray(ref_hw)
        worst[1] = max(worst[1], int(ref_hw[..., 0].max()) - 1)
        worst[2] = max(worst[2], int(ref_hw[..., 1].max()) - 1)
    bad = [f"axis {a} id {w} >= axes_lens[{a}] = {axes_lens[a]}" for a, w in enumerate(worst) if w >= axes_lens[a]]
    if bad:
        raise ValueError("Omni-RoPE position ids out of range (text too long or images too large): " + "; ".join(bad))


# ---- latents <-> padded tokens --------------------------------------------------------------------


def pack_latents(latents: Sequence[np.ndarray], patch: int, num_tokens: int | None = None):
    """A list of ``[h, w, C]`` latents (sizes may differ) -> ``(tokens [B, N, p·p·C], hw [B, 2])`` (numpy).

    ``N`` is ``num_tokens`` or the largest token count; shorter images are zero-padded at the end."""
    toks = [patchify_latent(np.asarray(z)[None], patch)[0] for z in latents]
    n = max(t.shape[0] for t in toks) if num_tokens is None else int(num_tokens)
    if any(t.shape[0] > n for t in toks):
        raise ValueError(f"an image has more than num_tokens={n} tokens")
    out = np.zeros((len(toks), n, toks[0].shape[1]), np.float32)
    for i, t in enumerate(toks):
        out[i, : t.shape[0]] = t
    hw = np.asarray([[z.shape[0] // patch, z.shape[1] // patch] for z in latents], np.int32)
    return out, hw


def pack_references(refs: Sequence[Sequence[np.ndarray]], patch: int, max_refs: int | None = None,
                    num_tokens: int | None = None):
    """Per sample a list of reference latents ``[h, w, C]`` (possibly empty) ->
    ``(tokens [B, R, M, p·p·C], hw [B, R, 2])``; absent slots have ``hw = (0, 0)`` and zero tokens."""
    r = max_refs if max_refs is not None else max(1, max(len(s) for s in refs))
    flat = [z for s in refs for z in s]
    if not flat:
        raise ValueError("pack_references: no reference image in the batch (pass ref_tokens=None instead)")
    c = flat[0].shape[-1]
    m = max((z.shape[0] // patch) * (z.shape[1] // patch) for z in flat) if num_tokens is None else int(num_tokens)
    tokens = np.zeros((len(refs), r, m, patch * patch * c), np.float32)
    hw = np.zeros((len(refs), r, 2), np.int32)
    for b, s in enumerate(refs):
        if len(s) > r:
            raise ValueError(f"sample {b} has {len(s)} reference images, more than {r}")
        for i, z in enumerate(s):
            t, g = pack_latents([z], patch, m)
            tokens[b, i], hw[b, i] = t[0], g[0]
    return tokens, hw


def unpack_latents(tokens, hw, patch: int) -> list[np.ndarray]:
    """Inverse of ``pack_latents``: ``[B, N, p·p·C]`` + ``hw [B, 2]`` -> list of ``[h·p, w·p, C]``."""
    tokens, hw = np.asarray(tokens), np.asarray(hw)
    out = []
    for b in range(tokens.shape[0]):
        h, w = int(hw[b, 0]), int(hw[b, 1])
        out.append(np.asarray(unpatchify_latent(tokens[b:b + 1, : h * w], h, w, patch))[0])
    return out


# ---- the condition from the MLLM ------------------------------------------------------------------


def mllm_condition(hidden_states: jax.Array, attention_mask: jax.Array, *, max_len: int,
                   drop_mask: jax.Array | None = None):
    """The DiT condition from the MLLM's last hidden states (after its final norm) ``[B, L, D]``.

    * Every token of the templated prompt is kept (system prompt, image-pad tokens included: SGT's
      segmentation training and the text-only pipeline), with ``attention_mask`` as the text mask.
    * ``drop_mask [B, L]`` (True = drop), when given, removes those positions and compacts the rest to
      the left with a new mask (the chat pipeline drops the image-token positions this way); shapes
      stay ``[B, L]``.
    * Longer than ``max_len`` (= ``axes_lens[0] - 128`` officially): only the last ``max_len``
      positions are kept, as the official training does (a static slice).
    Returns ``(condition [B, L', D], mask [B, L'] bool)``.
    """
    mask = attention_mask.astype(bool)
    if drop_mask is not None:
        keep = mask & ~drop_mask.astype(bool)
        order = jnp.argsort(~keep, axis=1, stable=True)  # kept positions first, in their order
        hidden_states = jnp.take_along_axis(hidden_states, order[..., None], axis=1)
        count = jnp.sum(keep, axis=1, keepdims=True)
        mask = jnp.arange(mask.shape[1])[None, :] < count
    if hidden_states.shape[1] > max_len:
        hidden_states, mask = hidden_states[:, -max_len:], mask[:, -max_len:]
    return hidden_states, mask
