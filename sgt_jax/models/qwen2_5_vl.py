"""Qwen2.5-VL (OmniGen2's MLLM, Qwen2.5-VL-3B-Instruct) in Flax NNX: vision tower + M-RoPE Qwen2.5 decoder.

Reference: transformers ``models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (``Qwen2_5_VLForConditionalGeneration``)
and the official Qwen2.5-VL release. OmniGen2 conditions its diffusion transformer on the *last hidden
states* of this model (after the final RMSNorm), so the model returns both those and the logits.

Decoder (``TextModel``): token embedding; ``num_layers`` scanned pre-norm layers (RMSNorm, q/k/v
projections with bias, o projection without, GQA attention, RMSNorm, SwiGLU MLP); final RMSNorm; the
LM head (tied to the embedding in the 3B model: ``tie_word_embeddings``). Attention is causal within
a document (``doc`` per token, -1 = padding) and goes through ``sgt_jax/models/attention.py``.

M-RoPE: every token has three positions (temporal, height, width: ``sgt_jax/data/qwen_vl_plan.py``
``mrope_positions``). The ``head_dim / 2`` rotary frequencies are split in ``mrope_section`` groups
([16, 24, 24] in 3B): the first group rotates by the temporal position, the next by the height, the
last by the width; text tokens have the same value on all three axes, so for text this is plain RoPE.

Images enter as a vision pack (``VisionInputs``, built by ``qwen_vl_plan.vision_pack``); the vision
tower's merged tokens (window order) replace the embeddings of the image-pad tokens through
``vision_index`` (the reverse window permutation folded into one gather; -1 = keep the text embedding).

Decoding: ``step`` prefills or decodes with the ``KVCache`` of qwen2_mot.py (post-RoPE keys/values per
layer + token metadata); the caller keeps the cache (static shapes: preallocated slots).

Param tree: ``visual.*`` (see qwen2_5_vl_vision.py), ``language_model.embed_tokens.embedding``,
``language_model.layers.{input_norm,post_norm}.scale``, ``language_model.layers.{q,k,v}_proj.{kernel,bias}``
(kernels ``(embed, heads, head_dim)``), ``language_model.layers.o_proj.kernel`` ``(heads, head_dim, embed)``,
``language_model.layers.mlp.{gate,up,down}_proj.kernel``, ``language_model.norm.scale``, and
``language_model.lm_head.kernel`` only when the embeddings are untied.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgt_jax.models import attention as attn_lib
from sgt_jax.models.attention import TokenMeta
from sgt_jax.models.layers import (Dense, Embed, RMSNorm, SwiGLU, apply_rope, canonical_dtype, constrain,
                                   rope_inv_freq, stacked)
from sgt_jax.models.qwen2_5_vl_vision import VisionTower
from sgt_jax.models.qwen2_mot import KVCache
from sgt_jax.models.remat import remat


def config(variant: str = "3b") -> ml_collections.ConfigDict:
    """The MLLM config: ``3b`` = Qwen2.5-VL-3B-Instruct (its public config.json); ``tiny`` for tests."""
    if variant not in ("3b", "tiny"):
        raise ValueError(f"unknown Qwen2.5-VL variant {variant!r}; choose '3b' or 'tiny'")
    c = ml_collections.ConfigDict()
    c.text = ml_collections.ConfigDict(dict(
        hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128, intermediate_size=11008,
        vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, mrope_section=(16, 24, 24),
        tie_word_embeddings=True))
    c.vision = ml_collections.ConfigDict(dict(
        depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, window_size=112, fullatt_block_indexes=(7, 15, 23, 31), out_hidden_size=2048,
        in_channels=3, rope_theta=10000.0))
    c.tokens = ml_collections.ConfigDict(dict(image=151655, vision_start=151652, vision_end=151653,
                                              eos=151645, pad=151643))
    c.dtype, c.param_dtype = "bfloat16", "float32"
    c.attention_impl, c.attention_chunk = "chunked", 512
    c.remat_policy, c.scan_layers = "full", True
    if variant == "tiny":
        c.text.update(dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           intermediate_size=128, vocab_size=512, mrope_section=(2, 3, 3)))
        c.vision.update(dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, window_size=56,
                             fullatt_block_indexes=(2,), out_hidden_size=64))
        c.tokens.update(dict(image=500, vision_start=501, vision_end=502, eos=503, pad=504))
        c.dtype, c.attention_impl, c.remat_policy = "float32", "dense", "none"
    return c


class VisionInputs(NamedTuple):
    """A vision pack (sgt_jax/data/qwen_vl_plan.py ``vision_pack`` + ``gather_patches``), leading dim Bv."""

    patches: jax.Array  # float [Bv, P, C·T·ps·ps]
    image_id: jax.Array  # int32 [Bv, P], pad -1
    window_id: jax.Array  # int32 [Bv, P], pad -1
    pos_hw: jax.Array  # int32 [Bv, P, 2]


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, sections) -> tuple[jax.Array, jax.Array]:
    """fp32 cos/sin ``[B, T, head_dim]`` from M-RoPE positions ``[3, B, T]`` (see the module doc)."""
    sections = tuple(int(s) for s in sections)
    if len(sections) != 3 or sum(sections) != head_dim // 2:
        raise ValueError(f"mrope_section {sections} must be 3 numbers summing to head_dim/2 = {head_dim // 2}")
    axis = np.repeat(np.arange(3), sections)  # which position axis drives each frequency
    inv = jnp.asarray(rope_inv_freq(head_dim, theta))
    pos = jnp.moveaxis(positions.astype(jnp.float32)[axis], 0, -1)  # [B, T, head_dim/2]
    f = pos * inv
    f = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(f), jnp.sin(f)


class DecoderLayer(nnx.Module):
    def __init__(self, t, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, nq, nkv, hd = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(h, t.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(h, (nq, hd), ("embed", "q_heads", "head_dim"), use_bias=True, **kw)
        self.k_proj = Dense(h, (nkv, hd), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.v_proj = Dense(h, (nkv, hd), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.o_proj = Dense((nq, hd), h, ("q_heads", "head_dim", "embed"), use_bias=False, **kw)
        self.post_norm = RMSNorm(h, t.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(h, t.intermediate_size, **kw)

    def __call__(self, x, cos, sin, meta: TokenMeta, cache=None, *, impl: str, chunk: int):
        """``cache``: ``(k, v, meta)`` of earlier tokens of this layer (None: none); returns ``(x, (k, v))``
        with the new tokens' post-RoPE keys and values."""
        h = self.input_norm(x)
        q = apply_rope(self.q_proj(h), cos, sin)
        k = apply_rope(self.k_proj(h), cos, sin)
        q, k, v = (checkpoint_name(constrain(a, ("batch", "seq", "act_heads", None)), "qkv")
                   for a in (q, k, self.v_proj(h)))
        keys, vals, k_meta = k, v, meta
        if cache is not None:
            keys = jnp.concatenate([cache[0].astype(k.dtype), k], axis=1)
            vals = jnp.concatenate([cache[1].astype(v.dtype), v], axis=1)
            k_meta = cache[2].concat(meta)
        ctx = checkpoint_name(attn_lib.attention(q, keys, vals, meta, k_meta, impl=impl, chunk=chunk), "attn_out")
        x = x + self.o_proj(ctx)
        x = x + self.mlp(self.post_norm(x))
        return constrain(x, ("batch", "seq", "act_embed")), (k, v)


class TextModel(nnx.Module):
    """Embedding, scanned decoder layers, final norm, LM head (tied or not)."""

    def __init__(self, t, *, dtype, param_dtype, attention_impl, attention_chunk, remat_policy, scan_layers,
                 rngs: nnx.Rngs):
        if t.num_heads % t.num_kv_heads:
            raise ValueError(f"text num_heads {t.num_heads} not divisible by num_kv_heads {t.num_kv_heads}")
        self.dtype = canonical_dtype(dtype)
        self.num_layers, self.head_dim, self.theta = int(t.num_layers), int(t.head_dim), float(t.rope_theta)
        self.sections = tuple(int(s) for s in t.mrope_section)
        self.impl, self.chunk = attention_impl, int(attention_chunk)
        self.remat_policy, self.scan_layers = remat_policy, bool(scan_layers)
        self.tied = bool(t.tie_word_embeddings)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, rngs=rngs, **kw)

        self.layers = stacked(self.num_layers, lambda r: DecoderLayer(t, rngs=r, **kw), rngs)
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if self.tied else Dense(t.hidden_size, t.vocab_size, ("embed", "vocab"), use_bias=False,
                                                    rngs=rngs, **kw)

    def logits(self, h: jax.Array) -> jax.Array:
        """fp32 logits of hidden states ``[..., H]`` (matmul in the compute dtype, fp32 accumulation)."""
        if self.tied:
            kernel, spec = self.embed_tokens.embedding[...].astype(self.dtype), "...h,vh->...v"
        else:
            kernel, spec = self.lm_head.kernel[...].astype(self.dtype), "...h,hv->...v"
        out = jnp.einsum(spec, h.astype(self.dtype), kernel, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "seq", "act_vocab")) if out.ndim == 3 else out

    def __call__(self, x: jax.Array, positions: jax.Array, doc: jax.Array, order: jax.Array | None = None, *,
                 kv_cache: KVCache | None = None, return_kv: bool = False):
        """Embeddings ``x [B, T, H]``, M-RoPE ``positions [3, B, T]``, ``doc [B, T]`` (-1 pad) -> final-normed
        hidden states ``[B, T, H]``. A token sees the tokens of its doc whose ``order`` is not larger
        (default order: the physical index, i.e. causal).

        Decoding (the ``KVCache`` of qwen2_mot.py): ``kv_cache.k/v [num_layers, B, S, Hkv, D]`` (post-RoPE,
        compute dtype) with ``kv_cache.meta`` ``[B, S]`` (unused slots doc -1) are attended to as well; give
        new tokens an ``order`` above every cached one and the positions that continue the prompt
        (``mrope_positions``' delta + index). With ``return_kv`` the result is ``(h, KVCache of the new
        tokens)``; the caller writes it into its cache."""
        b, t, _ = x.shape
        if positions.shape != (3, b, t) or doc.shape != (b, t):
            raise ValueError(f"positions {positions.shape} must be (3, {b}, {t}) and doc {doc.shape} ({b}, {t})")
        if order is None:
            order = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        zeros = jnp.zeros((b, t), jnp.int32)
        meta = TokenMeta(doc.astype(jnp.int32), zeros, zeros + attn_lib.CAUSAL, order.astype(jnp.int32))
        caches = None
        if kv_cache is not None:
            if kv_cache.k.shape[:2] != (self.num_layers, b) or kv_cache.meta.doc.shape != kv_cache.k.shape[1:3]:
                raise ValueError(f"kv_cache k {kv_cache.k.shape} must be [{self.num_layers}, {b}, S, Hkv, D] with "
                                 f"meta [B, S]; meta is {kv_cache.meta.doc.shape}")
            caches = (kv_cache.k, kv_cache.v)
        cos, sin = mrope_cos_sin(positions, self.head_dim, self.theta, self.sections)
        x = constrain(x.astype(self.dtype), ("batch", "seq", "act_embed"))
        graphdef, state = nnx.split(self.layers)
        impl, chunk = self.impl, self.chunk

        def body(h, xs):
            layer_state, kv = xs
            cache = None if kv is None else (kv[0], kv[1], kv_cache.meta)
            h, new = nnx.merge(graphdef, layer_state)(h, cos, sin, meta, cache, impl=impl, chunk=chunk)
            return h, (new if return_kv else None)

        body = remat(body, self.remat_policy)
        if self.scan_layers:
            x, kv = jax.lax.scan(body, x, (state, caches))
        else:
            ys = []
            for i in range(self.num_layers):
                x, y = body(x, jax.tree.map(lambda a: a[i], (state, caches)))
                ys.append(y)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *ys) if return_kv else None
        h = self.norm(x)
        return (h, KVCache(kv[0], kv[1], meta)) if return_kv else h


class Qwen2_5_VL(nnx.Module):
    """``visual`` (VisionTower) + ``language_model`` (TextModel). See the module doc."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if cfg.attention_impl not in attn_lib.IMPLS:
            raise ValueError(f"unknown attention_impl {cfg.attention_impl!r}; choose one of {attn_lib.IMPLS}")
        remat(lambda x: x, cfg.remat_policy)  # validate the name now, not at the first call
        if cfg.vision.out_hidden_size != cfg.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {cfg.vision.out_hidden_size} != text hidden_size "
                             f"{cfg.text.hidden_size}")
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, attention_impl=cfg.attention_impl,
                  attention_chunk=cfg.attention_chunk, remat_policy=cfg.remat_policy, rngs=rngs)
        self.visual = VisionTower(cfg.vision, **kw)
        self.language_model = TextModel(cfg.text, scan_layers=cfg.scan_layers, **kw)

    def embed(self, tokens: jax.Array, vision: VisionInputs | None = None,
              vision_index: jax.Array | None = None) -> jax.Array:
        """Token embeddings ``[B, T, H]`` with the merged vision tokens put at the image-pad positions."""
        x = self.language_model.embed_tokens(tokens)
        if vision is None:
            return x
        if vision_index is None or vision_index.shape != tokens.shape:
            raise ValueError(f"vision inputs need vision_index of the tokens' shape {tokens.shape}")
        merged = self.visual(vision.patches, vision.image_id, vision.window_id, vision.pos_hw)
        flat = merged.reshape(-1, merged.shape[-1]).astype(x.dtype)
        picked = jnp.take(flat, jnp.maximum(vision_index, 0), axis=0)
        return jnp.where((vision_index >= 0)[..., None], picked, x)

    def hidden_states(self, tokens, positions, doc=None, vision: VisionInputs | None = None, vision_index=None):
        """Final-normed last hidden states ``[B, T, H]`` (what OmniGen2's DiT is conditioned on)."""
        if doc is None:
            doc = jnp.zeros(tokens.shape, jnp.int32)
        return self.language_model(self.embed(tokens, vision, vision_index), positions, doc)

    def logits(self, h: jax.Array) -> jax.Array:
        return self.language_model.logits(h)

    def __call__(self, tokens, positions, doc=None, vision: VisionInputs | None = None, vision_index=None):
        """``tokens [B, T]``, ``positions [3, B, T]``, ``doc [B, T]`` (None: one document per row) ->
        ``(logits [B, T, V] fp32, hidden [B, T, H])``. For training, call ``hidden_states`` and project
        only the labelled positions with ``logits``."""
        h = self.hidden_states(tokens, positions, doc, vision, vision_index)
        return self.logits(h), h

    def step(self, tokens, positions, order, kv_cache: KVCache | None = None, doc=None,
             vision: VisionInputs | None = None, vision_index=None):
        """Prefill (``kv_cache`` None) or decode with a KV cache (see ``TextModel.__call__``): returns
        ``(logits [B, T, V], hidden [B, T, H], KVCache of the new tokens)``."""
        if doc is None:
            doc = jnp.zeros(tokens.shape, jnp.int32)
        h, kv = self.language_model(self.embed(tokens, vision, vision_index), positions, doc, order,
                                    kv_cache=kv_cache, return_kv=True)
        return self.logits(h), h, kv
