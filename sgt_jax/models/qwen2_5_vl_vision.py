"""The Qwen2.5-VL vision tower in Flax NNX (transformers ``modeling_qwen2_5_vl.py``:
``Qwen2_5_VisionTransformerPretrainedModel``; official Qwen2.5-VL release).

What it computes, on a *pack*: the patches of several images of any sizes in one static-length stream
(``sgt_jax/data/qwen_vl_plan.py`` ``vision_pack`` builds the layout):

1. patch embedding: the Conv3d (kernel = stride = (temporal_patch, patch, patch), no bias) applied to a
   flattened (C, T, ps, ps) patch vector is a matmul with a kernel ``(C, T, ps, ps, hidden)``;
2. ``depth`` pre-norm blocks: RMSNorm (eps 1e-6), attention with a fused qkv projection (bias), 2-D
   rotary on q/k, output projection (bias); RMSNorm, SwiGLU MLP with biases. Blocks listed in
   ``fullatt_block_indexes`` attend over each whole image (``image_id``), the others inside windows
   (``window_id``): both are the same masked attention with a different id per patch, so the block
   stack is one ``lax.scan`` with a per-layer boolean;
3. the patch merger: RMSNorm, 2x2 neighbouring patches (4 consecutive rows of the stream) concatenated,
   Linear - GELU (exact erf) - Linear to the LLM width.

2-D rotary: the head is split as [row freqs | col freqs | row freqs | col freqs] with
``head_dim / 4`` frequencies ``theta^(-2k/(head_dim/2))`` each (theta 10000), rotate-half pairing,
applied in fp32.

Attention goes through ``sgt_jax/models/attention.py`` (dense or chunked): the per-patch id becomes the
``doc`` of a bidirectional (``FULL``) split, so a patch sees exactly the patches with its id, padding
(id -1) sees nothing and outputs 0. Because each window is contiguous in the pack, the chunked
implementation skips every key block a query block shares no window with: windowed blocks cost
O(P · chunk), not O(P²).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgt_jax.models import attention as attn_lib
from sgt_jax.models.attention import TokenMeta
from sgt_jax.models.layers import Dense, RMSNorm, constrain, rope_inv_freq, stacked
from sgt_jax.models.remat import remat

VISION_EPS = 1e-6  # fixed in the official code (not a config field)


def rotate_half_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE in fp32 on ``x [B, P, heads, D]`` with ``cos/sin [B, P, D]``; result in x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def vision_rope_cos_sin(pos_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """fp32 cos/sin ``[B, P, head_dim]`` of the 2-D rotary for (row, col) positions ``pos_hw [B, P, 2]``."""
    inv = jnp.asarray(rope_inv_freq(head_dim // 2, theta))  # head_dim/4 frequencies
    f = pos_hw.astype(jnp.float32)[..., None] * inv  # [B, P, 2, head_dim/4]
    f = jnp.concatenate([f[..., 0, :], f[..., 1, :]], axis=-1)
    f = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(f), jnp.sin(f)


class VisionBlock(nnx.Module):
    def __init__(self, v, *, dtype, param_dtype, rngs: nnx.Rngs):
        dv, nh, inter = v.hidden_size, v.num_heads, v.intermediate_size
        hd = dv // nh
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(dv, VISION_EPS, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = RMSNorm(dv, VISION_EPS, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense(dv, (3, nh, hd), ("vit_embed", None, "vit_heads", "vit_head_dim"), use_bias=True, **kw)
        self.proj = Dense((nh, hd), dv, ("vit_heads", "vit_head_dim", "vit_embed"), use_bias=True, **kw)
        self.gate_proj = Dense(dv, inter, ("vit_embed", "vit_mlp"), use_bias=True, **kw)
        self.up_proj = Dense(dv, inter, ("vit_embed", "vit_mlp"), use_bias=True, **kw)
        self.down_proj = Dense(inter, dv, ("vit_mlp", "vit_embed"), use_bias=True, **kw)

    def __call__(self, x, cos, sin, meta: TokenMeta, *, impl: str, chunk: int):
        qkv = self.qkv(self.norm1(x))  # [B, P, 3, heads, hd]
        q = rotate_half_rope(qkv[:, :, 0], cos, sin)
        k = rotate_half_rope(qkv[:, :, 1], cos, sin)
        q, k, v = (checkpoint_name(constrain(a, ("batch", "seq", "act_heads", None)), "qkv")
                   for a in (q, k, qkv[:, :, 2]))
        ctx = checkpoint_name(attn_lib.attention(q, k, v, meta, meta, impl=impl, chunk=chunk), "attn_out")
        x = x + self.proj(ctx)
        h = self.norm2(x)
        hidden = constrain(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h), ("batch", "seq", "act_mlp"))
        return constrain(x + self.down_proj(hidden), ("batch", "seq", "act_embed"))


class PatchMerger(nnx.Module):
    """RMSNorm, merge² consecutive patches concatenated, Linear - GELU - Linear (``merger.mlp.0/2``)."""

    def __init__(self, v, *, dtype, param_dtype, rngs: nnx.Rngs):
        dv, unit = v.hidden_size, v.spatial_merge_size ** 2
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=True)
        self.unit = unit
        self.ln_q = RMSNorm(dv, VISION_EPS, param_dtype=param_dtype, rngs=rngs)
        self.mlp_0 = Dense(unit * dv, unit * dv, ("vit_embed", "vit_mlp"), **kw)
        self.mlp_2 = Dense(unit * dv, v.out_hidden_size, ("vit_mlp", "embed"), **kw)

    def __call__(self, x):
        b, p, d = x.shape
        h = self.ln_q(x).reshape(b, p // self.unit, self.unit * d)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(h), approximate=False))


class VisionTower(nnx.Module):
    """Patch embedding, ``depth`` scanned blocks, patch merger.

    Param tree (the conversion table maps it to ``visual.*``): ``patch_embed.kernel``
    ``(C, T, ps, ps, hidden)``; ``blocks.{norm1,norm2}.scale``, ``blocks.qkv.{kernel,bias}`` (kernel
    ``(hidden, 3, heads, head_dim)``), ``blocks.proj``, ``blocks.{gate,up,down}_proj`` with a leading
    ``layers`` axis; ``merger.ln_q.scale``, ``merger.mlp_0``, ``merger.mlp_2``.
    """

    def __init__(self, v, *, dtype, param_dtype, attention_impl: str, attention_chunk: int,
                 remat_policy: str, rngs: nnx.Rngs):
        if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
            raise ValueError(f"vision hidden_size {v.hidden_size} / num_heads {v.num_heads} must give a head_dim "
                             "divisible by 4 (2-D rotary)")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ValueError(f"vision fullatt_block_indexes {list(bad)} outside [0, depth={v.depth})")
        self.depth, self.head_dim, self.theta = int(v.depth), v.hidden_size // v.num_heads, float(v.rope_theta)
        self.full = tuple(i in set(v.fullatt_block_indexes) for i in range(self.depth))  # static, not state
        self.patch_dims = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        self.impl, self.chunk, self.remat_policy = attention_impl, int(attention_chunk), remat_policy
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = Dense(self.patch_dims, v.hidden_size, ("vit_patch", None, None, None, "vit_embed"),
                                 use_bias=False, rngs=rngs, **kw)

        self.blocks = stacked(self.depth, lambda r: VisionBlock(v, rngs=r, **kw), rngs)
        self.merger = PatchMerger(v, rngs=rngs, **kw)

    def __call__(self, patches, image_id, window_id, pos_hw):
        """patches [B, P, C·T·ps·ps] (window order, see qwen_vl_plan.vision_pack), image_id / window_id
        [B, P] (pad -1), pos_hw [B, P, 2] -> merged tokens [B, P / merge², out_hidden] in window order."""
        b, p, dflat = patches.shape
        if dflat != int(np.prod(self.patch_dims)):
            raise ValueError(f"vision patches must be [B, P, {int(np.prod(self.patch_dims))}], got {patches.shape}")
        if image_id.shape != (b, p) or window_id.shape != (b, p) or pos_hw.shape != (b, p, 2):
            raise ValueError(f"image_id {image_id.shape} / window_id {window_id.shape} must be {(b, p)}, "
                             f"pos_hw {pos_hw.shape} must be {(b, p, 2)}")
        x = self.patch_embed(patches.reshape(b, p, *self.patch_dims))
        x = constrain(x, ("batch", "seq", "act_embed"))
        cos, sin = vision_rope_cos_sin(pos_hw, self.head_dim, self.theta)
        zeros = jnp.zeros((b, p), jnp.int32)
        mode = jnp.full((b, p), attn_lib.FULL, jnp.int32)
        graphdef, state = nnx.split(self.blocks)
        impl, chunk = self.impl, self.chunk

        def body(h, xs):
            layer_state, full = xs
            meta = TokenMeta(jnp.where(full, image_id, window_id).astype(jnp.int32), zeros, mode, zeros)
            return nnx.merge(graphdef, layer_state)(h, cos, sin, meta, impl=impl, chunk=chunk), None

        x, _ = jax.lax.scan(remat(body, self.remat_policy), x, (state, jnp.asarray(self.full)))
        return self.merger(x)
