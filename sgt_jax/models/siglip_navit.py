"""SigLIP NaViT vision encoder (BAGEL's ViT), Flax NNX.

What it computes (ByteDance-Seed/Bagel `modeling/bagel/siglip_navit.py`): several images are cut into 14x14 patches, concatenated
into one patch stream per pack, embedded by a Linear layer (BAGEL stores SigLIP's Conv2d patch
embedding in Linear form), summed with SigLIP's *learned* position table indexed by ``row*G + col``
(G = ``max_patches_per_side``; a small image uses the top-left sub-grid, no interpolation), passed
through pre-LN encoder layers whose attention is bidirectional inside each image and never crosses
images, and finally through ``post_layernorm``.

Why this shape of code:
* Sub-module names mirror HF/BAGEL (``patch_embedding``, ``position_embedding``, ``layers``,
  ``self_attn.{q,k,v,out}_proj``, ``layer_norm{1,2}``, ``mlp.fc{1,2}``, ``post_layernorm``) so the
  conversion table (sgt_jax/checkpoint/vision_tables.py) reads like a rename.
* The encoder layers are *stacked*: every layer parameter has a leading ``layers`` axis and the
  forward runs ``jax.lax.scan`` over it, so compile time does not grow with depth (26 layers at 7B).
* q/k/v/out kernels (the shared ``layers.Dense``) keep the head axis explicit ([embed, heads, head_dim])
  so tensor parallelism can shard heads through the logical axis rules.
* Attention is written out (no kernel library): a dense path for short streams and a query-chunked
  path whose peak memory is O(chunk x P) instead of O(P^2) for long packed streams.
* The image-id mask allows a query to see key k iff ``image_id[q] == image_id[k]``. Real images have
  ids >= 0, so real tokens never see padding (id -1); padding rows see only padding, so every row
  has at least one visible key (itself) and the softmax stays finite without special cases.

Every parameter carries logical sharding names and is created unplaced (``eager_sharding=False``):
placement comes from ``jit(out_shardings)`` through the rules table, as for the LLM.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models import attention as attn_lib
from sgt_jax.models.layers import Dense, canonical_dtype, constrain
from sgt_jax.models.remat import POLICIES as REMAT_POLICIES
from sgt_jax.models.remat import remat

ATTENTION_IMPLS = attn_lib.IMPLS


def _named(init, names):
    """Initializer carrying logical axis names; unplaced (placement comes from jit out_shardings), so the
    module builds with or without a mesh context, like sgt_jax/models/layers.py ``make_param``."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def _layer_norm(features, eps, *, dtype, param_dtype, rngs):
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=_named(nnx.initializers.ones, ("norm",)),
        bias_init=_named(nnx.initializers.zeros, ("norm",)),
        rngs=rngs,
    )


def image_attention(q, k, v, image_id, *, impl: str = "dense", chunk: int = 512, blocks=(512, 512)):
    """Softmax attention restricted to tokens of the same image.

    q, k, v: [B, P, N, D]; image_id: [B, P] int (pad = -1). Returns [B, P, N, D] in q's dtype.
    Logits and softmax are computed in fp32. ``impl="chunked"`` scans over query blocks of ``chunk``
    rows (the last block is padded) and rematerialises each block in the backward pass.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} unknown; choose one of {ATTENTION_IMPLS}")
    if attn_lib.resolve_impl(impl) == "pallas":
        # The BAGEL kernel with the image id as the document (one full-attention split per image):
        # other images' blocks are skipped. Pad patches (id -1) output 0 here (dense: a pad-only softmax).
        full = jnp.full_like(image_id, attn_lib.FULL)
        meta = attn_lib.TokenMeta(image_id, image_id, full, jnp.zeros_like(image_id))
        return attn_lib.pallas_attention(q, k, v, meta, meta, blocks=blocks, name="vit_flash")
    scale = 1.0 / math.sqrt(q.shape[-1])

    def block(qb, idq):
        logits = jnp.einsum("bqnd,bknd->bnqk", qb, k, preferred_element_type=jnp.float32) * scale
        mask = (idq[:, :, None] == image_id[:, None, :])[:, None]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bnqk,bknd->bqnd", probs, v)

    b, p, n, d = q.shape
    if impl == "dense" or p <= chunk:
        return block(q, image_id)
    nblk = -(-p // chunk)
    pad = nblk * chunk - p
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    idp = jnp.pad(image_id, ((0, 0), (0, pad)), constant_values=-1)
    qp = qp.reshape(b, nblk, chunk, n, d).swapaxes(0, 1)
    idp = idp.reshape(b, nblk, chunk).swapaxes(0, 1)
    out = jax.lax.map(lambda a: jax.checkpoint(block)(*a), (qp, idp))  # [nblk, B, chunk, N, D]
    return out.swapaxes(0, 1).reshape(b, nblk * chunk, n, d)[:, :p]


class SiglipAttention(nnx.Module):
    """Multi-head self-attention with biases on q/k/v/out (SigLIP)."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs, attention_impl="dense", attention_chunk=512,
                 attention_blocks=(512, 512)):
        hv, nh = cfg.hidden_size, cfg.num_heads
        if hv % nh:
            raise ValueError(f"vit.hidden_size {hv} is not divisible by vit.num_heads {nh}")
        hd = hv // nh
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        heads = ("vit_heads", "vit_head_dim")
        self.q_proj = Dense(hv, (nh, hd), ("vit_embed",) + heads, use_bias=True, **kw)
        self.k_proj = Dense(hv, (nh, hd), ("vit_embed",) + heads, use_bias=True, **kw)
        self.v_proj = Dense(hv, (nh, hd), ("vit_embed",) + heads, use_bias=True, **kw)
        self.out_proj = Dense((nh, hd), hv, heads + ("vit_embed",), use_bias=True, **kw)
        self.impl, self.chunk, self.blocks = attention_impl, attention_chunk, tuple(attention_blocks)

    def __call__(self, x, image_id):
        q, k, v = (constrain(f(x), ("batch", "seq", "act_heads", None)) for f in (self.q_proj, self.k_proj, self.v_proj))
        o = image_attention(q, k, v, image_id, impl=self.impl, chunk=self.chunk, blocks=self.blocks)
        return self.out_proj(o)


class SiglipMLP(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("vit_embed", "vit_mlp"), use_bias=True, **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("vit_mlp", "vit_embed"), use_bias=True, **kw)

    def __call__(self, x):
        hidden = constrain(jax.nn.gelu(self.fc1(x), approximate=True), ("batch", "seq", "act_mlp"))  # gelu_pytorch_tanh
        return self.fc2(hidden)


class SiglipEncoderLayer(nnx.Module):
    """Pre-LN block: ``x += attn(LN1(x)); x += mlp(LN2(x))``."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs, attention_impl="dense", attention_chunk=512,
                 attention_blocks=(512, 512)):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.self_attn = SiglipAttention(cfg, attention_impl=attention_impl, attention_chunk=attention_chunk,
                                         attention_blocks=attention_blocks, **kw)
        self.layer_norm2 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = SiglipMLP(cfg, **kw)

    def __call__(self, x, image_id):
        x = x + self.self_attn(self.layer_norm1(x), image_id)
        return x + self.mlp(self.layer_norm2(x))


class SiglipNaViT(nnx.Module):
    """The packed-stream SigLIP encoder.

    Args:
      cfg_vit: ``config.model.vit`` (hidden_size, intermediate_size, num_heads, num_layers, patch_size,
        max_patches_per_side, layer_norm_eps).
      dtype: compute dtype (e.g. "bfloat16"); param_dtype: storage dtype of the weights.
      attention_impl / attention_chunk / attention_blocks: "dense", "chunked" (query blocks of
        ``attention_chunk``), "pallas" (the BAGEL kernel, image id as document, ``attention_blocks``) or
        "auto" (pallas on TPU, chunked elsewhere).
      remat_policy: one of sgt_jax.models.remat.POLICIES, applied to each scanned layer (``model.remat_policy``).
    """

    def __init__(self, cfg_vit, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs,
                 attention_impl: str = "dense", attention_chunk: int = 512, remat_policy: str = "none",
                 attention_blocks: tuple[int, int] = (512, 512)):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {attention_impl!r} unknown; choose one of {ATTENTION_IMPLS}")
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {remat_policy!r} unknown; choose one of {REMAT_POLICIES}")
        dtype, param_dtype = canonical_dtype(dtype), canonical_dtype(param_dtype)
        ps, g, hv = int(cfg_vit.patch_size), int(cfg_vit.max_patches_per_side), int(cfg_vit.hidden_size)
        self.patch_size, self.max_patches_per_side = ps, g
        self.remat_policy = remat_policy
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embedding = Dense(3 * ps * ps, hv, ("vit_patch", "vit_embed"), use_bias=True, rngs=rngs, **kw)
        self.position_embedding = nnx.Embed(
            g * g, hv, embedding_init=_named(nnx.initializers.normal(0.02), ("vit_pos", "vit_embed")),
            rngs=rngs, **kw,
        )

        @nnx.split_rngs(splits=cfg_vit.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return SiglipEncoderLayer(cfg_vit, rngs=r, attention_impl=attention_impl,
                                      attention_chunk=attention_chunk, attention_blocks=attention_blocks, **kw)

        self.layers = make_layers(rngs)
        self.post_layernorm = _layer_norm(hv, cfg_vit.layer_norm_eps, rngs=rngs, **kw)

    def __call__(self, patches, pos, image_id):
        """patches [B,P,3*ps*ps] (order row-in-patch, col-in-patch, channel), pos [B,P] (row*G+col),
        image_id [B,P] (pad -1) -> [B,P,hidden]."""
        ps, g = self.patch_size, self.max_patches_per_side
        if patches.ndim != 3 or patches.shape[-1] != 3 * ps * ps:
            raise ValueError(f"vit patches must be [B,P,{3 * ps * ps}], got {patches.shape}")
        if pos.shape != patches.shape[:2] or image_id.shape != patches.shape[:2]:
            raise ValueError(f"vit pos {pos.shape} / image_id {image_id.shape} must be {patches.shape[:2]}")
        # Padding rows look up row 0 whatever their pos holds. A real id outside [0, G²) gives NaN
        # (jnp.take's fill mode), so a data bug shows up in the loss instead of silently clamping;
        # host-side `patchify` rejects such images up front.
        x = self.patch_embedding(patches) + self.position_embedding(jnp.where(image_id >= 0, pos, 0))
        x = constrain(x, ("batch", "seq", "act_embed"))

        graphdef, state = nnx.split(self.layers)

        def body(h, layer_state):
            return constrain(nnx.merge(graphdef, layer_state)(h, image_id), ("batch", "seq", "act_embed")), None

        x, _ = jax.lax.scan(remat(body, self.remat_policy), x, state)
        return self.post_layernorm(x)


def patchify(image, patch_size: int, max_patches_per_side: int):
    """Host-side NaViT patchify, BAGEL's order (Bagel: data/data_utils.py ``patchify``).

    image: [H, W, 3] float array (already normalised to [-1, 1]); H, W multiples of ``patch_size``.
    Returns ``patches`` [gh*gw, ps*ps*3] float32 (row-major patches; inside a patch: row, col,
    channel, channel fastest) and ``pos`` [gh*gw] int32 = ``row*max_patches_per_side + col``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"patchify expects an [H,W,3] image, got shape {image.shape}")
    h, w, _ = image.shape
    ps, g = patch_size, max_patches_per_side
    if h % ps or w % ps:
        raise ValueError(f"image sides {h}x{w} must be multiples of the ViT patch size {ps}")
    gh, gw = h // ps, w // ps
    if gh > g or gw > g:
        raise ValueError(f"image {h}x{w} has {gh}x{gw} patches; at most {g} per side are supported")
    patches = image.reshape(gh, ps, gw, ps, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, ps * ps * 3)
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    pos = (rows * g + cols).reshape(-1).astype(np.int32)
    return patches.astype(np.float32), pos
