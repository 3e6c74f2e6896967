"""Qwen2 Mixture-of-Transformers decoder of BAGEL-7B-MoT (Qwen2, transformers `models/qwen2/modeling_qwen2.py`).

Each layer holds an understanding (``und``) and a generation (``gen``) expert: q/k/v projections with
bias, o projection without, per-head q/k RMSNorm BEFORE RoPE, input/post RMSNorms and a SwiGLU MLP.
Attention is one joint softmax over all tokens of the pack, masked by the metadata rule
(sgt_jax/models/attention.py).

Routing decision: the token stream is physically split ``[0, U)`` und / ``[U, T)`` gen with a static
``U`` (docs/interfaces.md §1). Each expert runs on its own contiguous slice only, so there is no
gather/scatter and no wasted expert FLOPs; the attention does not care about physical order because
the mask is computed from each token's ``order``. The alternative (running both experts on every token
and selecting) doubles the MLP/projection FLOPs; boolean-index routing has dynamic shapes.

Layers are stacked on a leading ``layers`` axis (``nnx.vmap`` at init) and applied with
``jax.lax.scan`` over the stacked state, wrapped in the ``model.remat_policy`` (sgt_jax/models/remat.py).
With ``model.scan_layers=False`` the same stacked state is applied in a Python loop (debugging).

KV cache (inference). ``Qwen2MoT.__call__(x, meta, rope_pos, num_und=U, kv_cache=KVCache(k, v, meta),
return_kv=True)``:
  * ``kv_cache.k``, ``kv_cache.v``: ``[num_layers, B, S, Hkv, D]`` keys (after q/k-norm AND RoPE, i.e.
    exactly what attention consumes) and values of the S cached tokens, in the compute dtype;
  * ``kv_cache.meta``: ``TokenMeta`` ``[B, S]`` of the cached tokens (doc, split, mode, order; unused
    cache slots use doc = -1 and are ignored);
  * the new tokens ``x [B, T, H]`` (und first, then gen, split at ``num_und``) with their own
    ``meta`` and RoPE positions ``rope_pos [B, T]`` attend to ``[cache ‖ new]`` under the same rule.
    For "each new token sees the whole cache plus new tokens up to itself" give new tokens ``order``
    values larger than every cached token's;
  * returns ``(h, new_kv)`` with ``h`` the final-normed hidden states ``[B, T, H]`` and ``new_kv`` a
    ``KVCache`` of the NEW tokens only (``k, v [num_layers, B, T, Hkv, D]``, ``meta`` = the new meta);
    the caller appends it to its cache (static shapes: write into preallocated slots).
Text decoding = ``T=1, num_und=1``; VAE-image prefill = markers in ``[0, U)``, latents in ``[U, T)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgt_jax.models import attention as attn_lib
from sgt_jax.models.attention import TokenMeta, attention_blocks
from sgt_jax.models.layers import (Dense, Embed, RMSNorm, SwiGLU, apply_rope, canonical_dtype, constrain,
                                   rope_cos_sin)
from sgt_jax.models.remat import remat


class KVCache(NamedTuple):
    """Per-layer cached keys/values ``[num_layers, B, S, Hkv, D]`` and their metadata ``[B, S]``."""

    k: jax.Array
    v: jax.Array
    meta: TokenMeta


class Expert(nnx.Module):
    """One expert's weights of one MoT layer (BAGEL: the plain names for und, ``*_moe_gen`` for gen)."""

    def __init__(self, llm, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, nq, nkv, hd = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(h, llm.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(h, (nq, hd), ("embed", "q_heads", "head_dim"), use_bias=True, **kw)
        self.k_proj = Dense(h, (nkv, hd), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.v_proj = Dense(h, (nkv, hd), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.q_norm = RMSNorm(hd, llm.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.k_norm = RMSNorm(hd, llm.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = Dense((nq, hd), h, ("q_heads", "head_dim", "embed"), use_bias=False, **kw)
        self.post_norm = RMSNorm(h, llm.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(h, llm.intermediate_size, **kw)

    def qkv(self, x, cos, sin):
        """Pre-norm, projections, per-head q/k RMSNorm, then RoPE (in that order, spec §1.3)."""
        h = self.input_norm(x)
        q = apply_rope(self.q_norm(self.q_proj(h)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(h)), cos, sin)
        return q, k, self.v_proj(h)

    def attn_out(self, x, ctx, freeze: bool):
        o = self.o_proj(ctx)
        x = x + (jax.lax.stop_gradient(o) if freeze else o)
        m = self.mlp(self.post_norm(x))
        return x + (jax.lax.stop_gradient(m) if freeze else m)


class MoTLayer(nnx.Module):
    """One decoder layer: und and gen experts around one joint attention."""

    def __init__(self, llm, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.und = Expert(llm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gen = Expert(llm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, meta: TokenMeta, num_und: int, cache_k, cache_v, cache_meta, *,
                 impl: str, chunk: int, blocks: tuple[int, int], freeze_und: bool, return_probs: bool):
        t = x.shape[1]
        slices = [(e, a, b) for e, a, b in ((self.und, 0, num_und), (self.gen, num_und, t)) if b > a]
        qs, ks, vs = [], [], []
        for e, a, b in slices:
            q, k, v = e.qkv(x[:, a:b], cos[:, a:b], sin[:, a:b])
            if freeze_und and e is self.und:
                q, k, v = (jax.lax.stop_gradient(y) for y in (q, k, v))
            qs.append(q), ks.append(k), vs.append(v)
        q, k, v = (jnp.concatenate(y, axis=1) if len(y) > 1 else y[0] for y in (qs, ks, vs))
        q, k, v = (checkpoint_name(constrain(y, ("batch", "seq", "act_heads", None)), "qkv") for y in (q, k, v))
        keys, vals, k_meta = k, v, meta
        if cache_k is not None:
            keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
            vals = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
            k_meta = cache_meta.concat(meta)
        probs = None
        if return_probs:
            ctx, probs = attn_lib.dense_attention(q, keys, vals, meta, k_meta, return_probs=True)
        else:
            ctx = attn_lib.attention(q, keys, vals, meta, k_meta, impl=impl, chunk=chunk, blocks=blocks)
        if return_probs or attn_lib.resolve_impl(impl) != "pallas":  # the kernel tags its own o and lse
            ctx = checkpoint_name(ctx, "attn_out")
        outs = [e.attn_out(x[:, a:b], ctx[:, a:b], freeze_und and e is self.und) for e, a, b in slices]
        x = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
        return constrain(x, ("batch", "seq", "act_embed")), (k, v), probs


class Qwen2MoT(nnx.Module):
    """Embedding, stacked MoT layers, per-expert final norms and the untied lm_head.

    Submodule names (the param tree the converter maps to BAGEL keys): ``embed_tokens.embedding``,
    ``layers.{und,gen}.{input_norm,q_norm,k_norm,post_norm}.scale``,
    ``layers.{und,gen}.{q,k,v}_proj.{kernel,bias}``, ``layers.{und,gen}.o_proj.kernel``,
    ``layers.{und,gen}.mlp.{gate,up,down}_proj.kernel``, ``norm.scale``, ``norm_gen.scale``,
    ``lm_head.kernel``. Layer params carry a leading ``layers`` axis.
    """

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        llm = model_cfg.llm
        if llm.num_heads % llm.num_kv_heads:
            raise ValueError(f"model.llm.num_heads {llm.num_heads} not divisible by num_kv_heads {llm.num_kv_heads}")
        self.dtype = canonical_dtype(model_cfg.dtype)
        param_dtype = canonical_dtype(model_cfg.param_dtype)
        if model_cfg.attention_impl not in attn_lib.IMPLS:
            raise ValueError(f"unknown model.attention_impl {model_cfg.attention_impl!r}; choose one of {attn_lib.IMPLS}")
        self.impl = model_cfg.attention_impl
        self.chunk = int(model_cfg.attention_chunk)
        self.blocks = attention_blocks(model_cfg)
        self.remat_policy = model_cfg.remat_policy
        remat(lambda x: x, self.remat_policy)  # validate the name now, not at first call
        self.scan_layers = bool(model_cfg.scan_layers)
        self.freeze_und = bool(model_cfg.freeze_und)
        self.num_layers, self.head_dim, self.theta = llm.num_layers, llm.head_dim, llm.rope_theta
        kw = dict(dtype=self.dtype, param_dtype=param_dtype)

        self.embed_tokens = Embed(llm.vocab_size, llm.hidden_size, rngs=rngs, **kw)

        @nnx.split_rngs(splits=llm.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return MoTLayer(llm, rngs=r, **kw)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(llm.hidden_size, llm.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.norm_gen = RMSNorm(llm.hidden_size, llm.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = Dense(llm.hidden_size, llm.vocab_size, ("embed", "vocab"), use_bias=False, rngs=rngs, **kw)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def logits(self, h: jax.Array) -> jax.Array:
        """fp32 logits of hidden states ``[..., H]`` (matmul in the compute dtype, fp32 accumulation)."""
        kernel = self.lm_head.kernel[...].astype(self.dtype)
        logits = jnp.einsum("...h,hv->...v", h.astype(self.dtype), kernel, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab")) if logits.ndim == 3 else logits

    def __call__(self, x: jax.Array, meta: TokenMeta, rope_pos: jax.Array, *, num_und: int,
                 kv_cache: KVCache | None = None, return_kv: bool = False, return_probs: bool = False):
        """Run the decoder on embeddings ``x [B, T, H]`` (und tokens ``[0, num_und)``, gen after).

        Returns ``(h, new_kv, probs)``: final-normed hidden states ``[B, T, H]`` (und norm on the und
        slice, ``norm_gen`` on the gen slice); ``new_kv`` a ``KVCache`` of the new tokens when
        ``return_kv`` else None; ``probs`` ``[num_layers, B, Hq, T, S+T]`` fp32 attention
        probabilities when ``return_probs`` (dense path, analysis only) else None.
        """
        b, t, _ = x.shape
        num_und = int(num_und)
        if not 0 <= num_und <= t:
            raise ValueError(f"num_und={num_und} outside [0, {t}]")
        if meta.doc.shape != (b, t) or rope_pos.shape != (b, t):
            raise ValueError(f"meta {meta.doc.shape} / rope_pos {rope_pos.shape} must be [B, T] = {(b, t)}")
        if kv_cache is not None:
            want = (self.num_layers, b)
            if kv_cache.k.shape[:2] != want or kv_cache.v.shape != kv_cache.k.shape:
                raise ValueError(f"kv_cache k/v must be [num_layers, B, S, Hkv, D] with leading {want}; "
                                 f"got {kv_cache.k.shape} / {kv_cache.v.shape}")
            if kv_cache.meta.doc.shape != kv_cache.k.shape[1:3]:
                raise ValueError(f"kv_cache meta {kv_cache.meta.doc.shape} must be [B, S] = {kv_cache.k.shape[1:3]}")
            cache_k, cache_v, cache_meta = kv_cache
        else:
            cache_k = cache_v = cache_meta = None
        x = constrain(x.astype(self.dtype), ("batch", "seq", "act_embed"))
        if self.freeze_und and num_und:
            x = jnp.concatenate([jax.lax.stop_gradient(x[:, :num_und]), x[:, num_und:]], axis=1)
        cos, sin = rope_cos_sin(rope_pos, self.head_dim, self.theta)
        graphdef, state = nnx.split(self.layers)

        def body(h, xs):
            layer_state, ck, cv = xs
            layer = nnx.merge(graphdef, layer_state)
            h, (k, v), probs = layer(h, cos, sin, meta, num_und, ck, cv, cache_meta, impl=self.impl,
                                     chunk=self.chunk, blocks=self.blocks, freeze_und=self.freeze_und, return_probs=return_probs)
            return h, ((k, v) if return_kv else None, probs)

        body = remat(body, self.remat_policy)
        if self.scan_layers:
            x, (kv, probs) = jax.lax.scan(body, x, (state, cache_k, cache_v))
        else:
            ys = []
            for i in range(self.num_layers):
                xs = jax.tree.map(lambda a: a[i], (state, cache_k, cache_v))
                x, y = body(x, xs)
                ys.append(y)
            kv, probs = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else (None, None)

        parts = []
        if num_und:
            hu = self.norm(x[:, :num_und])
            parts.append(jax.lax.stop_gradient(hu) if self.freeze_und else hu)
        if num_und < t:
            parts.append(self.norm_gen(x[:, num_und:]))
        h = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        new_kv = KVCache(kv[0], kv[1], meta) if return_kv else None
        return h, new_kv, probs
