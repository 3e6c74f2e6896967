"""KV-cache contexts and the jitted model calls of inference (ByteDance-Seed/Bagel `modeling/bagel/bagel.py`, `inferencer.py`).

A ``Context`` is BAGEL's per-flow cache (gen / cfg_text / cfg_img) with STATIC capacity ``S``:
  * ``k, v``  ``[num_layers, 1, S, Hkv, D]`` keys (after q/k-norm and RoPE) and values, compute dtype;
  * ``meta``  ``TokenMeta [1, S]`` of the cached tokens; unused slots have ``doc = -1`` and are ignored
    by the attention rule, so a cache is valid at any fill level without masks of its own;
  * host ints ``length`` (filled slots), ``rope`` (next RoPE position), ``order`` (next order index) and
    ``split`` (next split id).
Contexts are immutable values: appending returns a new Context, and "copying" a context (BAGEL's
``deepcopy``) is just keeping a reference.

Every model call goes through ``Engine`` (one ``nnx.split`` of the model, functions jitted over the
parameter state): ``append`` (prefill a block into a cache), ``decode_step`` (one text token against a
cache, written at a traced slot: one compile per cache capacity, whatever the step) and
``velocity`` (a latent query block against 1..3 stacked caches). Blocks are built host-side by
``sgt_jax/sampling/blocks.py`` in the packed-batch format of docs/interfaces.md §1, so the embedding
assembly is the training code's (``Bagel.embed_batch``).

Metadata of appended tokens: ``doc = 0``; one new split per block; ``order`` continues the context's
counter, so each new token sees the whole cache (plus its own block under the block's mode).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models.attention import CAUSAL, TokenMeta
from sgt_jax.models.qwen2_mot import KVCache


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class Context:
    """One flow's cache (see the module docstring); device arrays plus host-side counters."""

    k: jax.Array
    v: jax.Array
    meta: TokenMeta
    length: int = 0
    rope: int = 0
    order: int = 0
    split: int = 0

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    def replace(self, **kw) -> "Context":
        return dataclasses.replace(self, **kw)


def empty_context(model, capacity: int) -> Context:
    """A context with no tokens and room for ``capacity`` of them."""
    llm = model.cfg.llm
    shape = (llm.num_layers, 1, int(capacity), llm.num_kv_heads, llm.head_dim)
    dtype = model.llm.dtype
    neg = jnp.full((1, capacity), -1, jnp.int32)
    zero = jnp.zeros((1, capacity), jnp.int32)
    return Context(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), TokenMeta(neg, neg, zero, zero))


def stack_contexts(ctxs: Sequence[Context]) -> KVCache:
    """Stack contexts of equal capacity on the batch axis (one model call serves all CFG branches)."""
    caps = {c.capacity for c in ctxs}
    if len(caps) != 1:
        raise ValueError(f"contexts to stack must share one capacity, got {sorted(caps)}")
    return KVCache(jnp.concatenate([c.k for c in ctxs], axis=1), jnp.concatenate([c.v for c in ctxs], axis=1),
                   TokenMeta(*(jnp.concatenate(f, axis=0) for f in zip(*(c.meta for c in ctxs)))))


def _write(cache: KVCache, new: KVCache, start) -> KVCache:
    """Write ``new`` (k/v ``[L, B, T, ...]``, meta ``[B, T]``) into ``cache`` at slot ``start`` (traced)."""
    z = jnp.zeros((), jnp.int32)
    k = jax.lax.dynamic_update_slice(cache.k, new.k.astype(cache.k.dtype), (z, z, start, z, z))
    v = jax.lax.dynamic_update_slice(cache.v, new.v.astype(cache.v.dtype), (z, z, start, z, z))
    meta = TokenMeta(*(jax.lax.dynamic_update_slice(a, b.astype(a.dtype), (z, start))
                       for a, b in zip(cache.meta, new.meta)))
    return KVCache(k, v, meta)


def sample_logits(logits, key, *, greedy: bool, temperature, top_p):
    """Next token from fp32 logits ``[B, V]``: argmax, or softmax(logits/temperature) restricted to the
    smallest set of tokens whose probability mass reaches ``top_p`` (nucleus; ``top_p=1``: no cut)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # the top token is always kept
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class StaticGraph:
    """A graphdef usable as a static jit argument: the model keeps its ConfigDict (unhashable) in the
    graph, so hashing uses the config's JSON and equality the graphdefs themselves."""

    def __init__(self, graphdef, model_cfg):
        self.graphdef = graphdef
        self._key = model_cfg.to_json_best_effort(sort_keys=True)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, StaticGraph) and self._key == other._key and self.graphdef == other.graphdef


class Engine:
    """The model split once into (graphdef, state); jitted inference calls over that state."""

    def __init__(self, model):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.latent_dim = model.patch_latent_dim
        # Module-level jitted functions with the graphdef as a static argument: every Engine of the same
        # architecture in a process shares one compilation cache.
        static = StaticGraph(self.graphdef, model.cfg)
        self._append = functools.partial(_append_jit, static)
        self._decode = functools.partial(_decode_jit, static)
        self._velocity = functools.partial(_velocity_jit, static)
        self._query_probs = functools.partial(_velocity_jit, static, return_probs=True)

    # ---- prefill ----
    def append(self, ctx: Context, block: dict, *, rope_advance: int, return_probs: bool = False):
        """Append a block (blocks.py) to ``ctx``; returns the new context (and attention probabilities
        ``[L, 1, Hq, T, S+T]`` over [cache ‖ block] when ``return_probs``, for the analyses)."""
        t_real = int(block["n_real"])
        t_all = block["tokens"].shape[1]
        if ctx.length + t_all > ctx.capacity:
            raise ValueError(f"KV cache full: {ctx.length} cached + {t_all} new tokens > capacity "
                             f"{ctx.capacity}; raise the cache capacity (cache_bucket / max tokens)")
        meta, rope = block_meta(block, ctx)
        cache = KVCache(ctx.k, ctx.v, ctx.meta)
        arrays = {k: v for k, v in block.items() if isinstance(v, np.ndarray)}
        new_cache, probs = self._append(self.state, cache, arrays, meta, rope, jnp.int32(ctx.length),
                                        return_probs=return_probs)
        out = ctx.replace(k=new_cache.k, v=new_cache.v, meta=new_cache.meta, length=ctx.length + t_real,
                          rope=ctx.rope + rope_advance, order=ctx.order + t_real, split=ctx.split + 1)
        return (out, probs) if return_probs else out

    # ---- text decoding ----
    def decode_step(self, ctx: Context, token: int | jax.Array, key, *, greedy: bool, temperature: float,
                    top_p: float):
        """Feed one text token at the context's next slot; return (logits [V], next token, new context)."""
        if ctx.length + 1 > ctx.capacity:
            raise ValueError(f"KV cache full at {ctx.length} tokens (capacity {ctx.capacity}); raise "
                             "max_new_tokens' cache capacity")
        cache = KVCache(ctx.k, ctx.v, ctx.meta)
        scal = jnp.asarray([ctx.length, ctx.rope, ctx.order, ctx.split], jnp.int32)
        logits, nxt, cache = self._decode(self.state, cache, jnp.asarray(token, jnp.int32).reshape(1, 1), scal,
                                          key, jnp.float32(temperature), jnp.float32(top_p), greedy=greedy)
        ctx = ctx.replace(k=cache.k, v=cache.v, meta=cache.meta, length=ctx.length + 1, rope=ctx.rope + 1,
                          order=ctx.order + 1, split=ctx.split + 1)
        return logits[0], nxt[0], ctx

    # ---- image generation ----
    def velocity(self, ctxs: Sequence[Context], block: dict, x, t):
        """Velocities ``[len(ctxs), Z, p·p·zc]`` (fp32) of latents ``x [Z, ·]`` at timestep ``t`` for the
        latent query block ``block`` (blocks.latent_query_block) against each context (not cached)."""
        cache = stack_contexts(ctxs)
        metas, ropes = zip(*(block_meta(block, c) for c in ctxs))
        meta = TokenMeta(*(jnp.concatenate(f, axis=0) for f in zip(*metas)))
        rope = jnp.concatenate(ropes, axis=0)
        arrays = {k: v for k, v in block.items() if isinstance(v, np.ndarray)}
        return self._velocity(self.state, cache, arrays, meta, rope, jnp.asarray(x, jnp.float32),
                              jnp.float32(t))

    def query_probs(self, ctx: Context, block: dict, x, t):
        """Attention probabilities of the latent query block's LATENT tokens against [``ctx`` cache ‖
        block] at latents ``x`` and timestep ``t``, averaged over heads and latent tokens: ``[L, S+T]``
        (fp32, dense path; for the analyses). Memory inside: ``L·Hq·T·(S+T)`` floats."""
        meta, rope = block_meta(block, ctx)
        arrays = {k: v for k, v in block.items() if isinstance(v, np.ndarray)}
        return self._query_probs(self.state, stack_contexts([ctx]), arrays, meta, rope,
                                 jnp.asarray(x, jnp.float32), jnp.float32(t))


def block_meta(block: dict, ctx: Context) -> tuple[TokenMeta, jax.Array]:
    """Attention metadata and RoPE positions ``[1, T]`` of a block appended to ``ctx``.

    ``block["rel_order"]`` / ``block["rel_rope"]`` are offsets from the context's counters; pad tokens
    (kind 0) get doc = -1."""
    real = block["kind"] != 0
    doc = np.where(real, 0, -1).astype(np.int32)
    split = np.where(real, ctx.split, -1).astype(np.int32)
    mode = np.where(real, block["mode"], 0).astype(np.int32)
    order = np.where(real, ctx.order + block["rel_order"], 0).astype(np.int32)
    rope = (ctx.rope + block["rel_rope"]).astype(np.int32)
    return TokenMeta(*(jnp.asarray(a) for a in (doc, split, mode, order))), jnp.asarray(rope)


def _embed(model, arrays, x_t=None, t=None):
    batch = {k: jnp.asarray(v) for k, v in arrays.items()
             if k in ("tokens", "kind", "vit_patches", "vit_pos", "vit_image", "vit_row", "latent_pos")}
    z = batch["latent_pos"].shape[1] if "latent_pos" in batch else 0
    b = batch["tokens"].shape[0]
    if x_t is None:
        x_t = jnp.asarray(arrays["latents"], jnp.float32) if z else jnp.zeros((b, 0, model.patch_latent_dim))
        t = jnp.zeros((b, z), jnp.float32)
    return model.embed_batch(batch, x_t, t)


def _append_fn(static, state, cache, arrays, meta, rope, start, return_probs=False):
    model = nnx.merge(static.graphdef, state)
    x, u = _embed(model, arrays)
    _, new, probs = model.llm(x, meta, rope, num_und=u, kv_cache=cache, return_kv=True, return_probs=return_probs)
    return _write(cache, new, start), probs


def _decode_fn(static, state, cache, token, scal, key, temperature, top_p, greedy=True):
    model = nnx.merge(static.graphdef, state)
    length, rope, order, split = scal[0], scal[1], scal[2], scal[3]
    x = model.llm.embed(token)
    one = jnp.ones((1, 1), jnp.int32)
    meta = TokenMeta(0 * one, split * one, CAUSAL * one, order * one)
    h, new, _ = model.llm(x, meta, rope * one, num_und=1, kv_cache=cache, return_kv=True)
    logits = model.llm.logits(h[:, -1])
    nxt = sample_logits(logits, key, greedy=greedy, temperature=temperature, top_p=top_p)
    return logits, nxt, _write(cache, new, length)


def _velocity_fn(static, state, cache, arrays, meta, rope, x, t, return_probs=False):
    model = nnx.merge(static.graphdef, state)
    b = cache.k.shape[1]
    arrays = {k: jnp.broadcast_to(v, (b,) + v.shape[1:]) for k, v in arrays.items() if k != "latents"}
    z = arrays["latent_pos"].shape[1]
    x_t = jnp.broadcast_to(x[None], (b,) + x.shape)
    emb, u = _embed(model, arrays, x_t, jnp.full((b, z), t, jnp.float32))
    h, _, probs = model.llm(emb, meta, rope, num_und=u, kv_cache=cache, return_probs=return_probs)
    if return_probs:
        return probs[:, :, :, u:, :].mean(axis=(1, 2, 3))
    return model.llm2vae(h[:, u:]).astype(jnp.float32)


_append_jit = jax.jit(_append_fn, static_argnums=(0,), static_argnames=("return_probs",))
_decode_jit = jax.jit(_decode_fn, static_argnums=(0,), static_argnames=("greedy",))
_velocity_jit = jax.jit(_velocity_fn, static_argnums=(0,), static_argnames=("return_probs",))
