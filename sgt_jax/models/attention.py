"""BAGEL packed attention: the mask rule computed from per-token metadata, GQA, two implementations.

The rule (ByteDance-Seed/Bagel `data/data_utils.py`, docs/interfaces.md §1) for a query q and key k, both real:
``doc[q]==doc[k]`` and (``order[k] <= order[q]`` or (``split[q]==split[k]`` and ``mode[q]`` is full or
noise)) and not (``mode[k]`` is noise and ``split[k] != split[q]``). Pad tokens have ``doc == -1``;
nothing attends to them and they attend to nothing (their output is exactly 0, finite).

Why metadata and not a mask tensor: tokens are physically reordered by expert (und first, gen last)
and keys may come from a KV cache, so the rule must be evaluated from the tokens' own (doc, split,
mode, order), never from physical positions. Query and key metadata are separate for that reason.

Implementations (``model.attention_impl``):
- ``"dense"``: full ``[Tq, Tk]`` scores; simple, used by tests, small packs and the attention-analysis
  code (it can return the probabilities).
- ``"chunked"``: online softmax (flash-attention recurrence) over key blocks with ``lax.scan`` inside
  a ``lax.map`` over query blocks. The mask is computed per (query block, key block) from metadata, so
  no ``[T, T]`` array exists; the per-block body is rematerialised, so the backward pass stores only
  the running (max, sum, accumulator) per key block. A block pair whose mask is all False (above the
  causal diagonal, across documents, a hidden noise split, padding) skips its matmuls through a
  ``lax.cond`` on the block mask: the work done follows the mask actually present in the pack (in a
  BAGEL pack most pairs are dead: und queries never see noised latents, latents see only their own
  image and their document's context), while shapes stay static. Memory O(T·chunk).
  The skip is data-dependent, so a static FLOP count sees the cond's larger branch: sgt_jax/compile.py
  reports that upper bound and the skippable part separately.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sgt_jax.models.kernels import flash_bagel
from sgt_jax.models.layers import kernel_sharding
# The rule and the metadata live in mask_rule.py (the Pallas kernel evaluates them too); re-exported here.
from sgt_jax.models.mask_rule import CAUSAL, FULL, NOISE, TokenMeta, allowed, rule  # noqa: F401

IMPLS = ("dense", "chunked", "pallas", "auto")
_NEG = -1e30  # finite "minus infinity": fully masked rows never produce NaN


def _group(q: jax.Array, num_kv: int) -> jax.Array:
    """``[B, T, Hq, D] -> [B, T, Hkv, G, D]``: query head j uses KV head j // G (contiguous groups)."""
    b, t, hq, d = q.shape
    if hq % num_kv:
        raise ValueError(f"query heads {hq} not divisible by kv heads {num_kv}")
    return q.reshape(b, t, num_kv, hq // num_kv, d)


def _check(q, k, v, qm: TokenMeta, km: TokenMeta):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q [B,Tq,Hq,D], k=v [B,Tk,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}")
    if qm.doc.shape != q.shape[:2] or km.doc.shape != k.shape[:2]:
        raise ValueError(f"metadata shapes {qm.doc.shape}/{km.doc.shape} do not match q {q.shape[:2]} / k {k.shape[:2]}")


def dense_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, return_probs: bool = False):
    """Reference attention with full scores. Returns ``out [B,Tq,Hq,D]`` (and probs ``[B,Hq,Tq,Tk]`` fp32)."""
    _check(q, k, v, q_meta, k_meta)
    b, tq, hq, d = q.shape
    qg = _group(q, k.shape[2])
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    mask = allowed(q_meta, k_meta)[:, None, None]
    s = jnp.where(mask, s, _NEG)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * mask
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out.reshape(b, tq, hq, d).astype(q.dtype)
    if return_probs:
        return out, p.reshape(b, hq, tq, k.shape[1])
    return out


def _pad_axis1(x, n, value=0):
    if n == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n)
    return jnp.pad(x, pad, constant_values=value)


def chunked_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, chunk: int, skip_masked: bool = True):
    """Memory-lean attention: online softmax over key blocks of ``chunk``, query blocks of ``chunk``.

    Equal to ``dense_attention`` up to float rounding. Sequence lengths need not divide ``chunk``
    (queries/keys are padded internally with pad metadata). With ``skip_masked`` (the default) a
    (query block, key block) pair whose mask is all False runs no matmul (``lax.cond``): the result is
    bitwise the same as computing it, since such a block adds exactly nothing to the running sums.
    """
    _check(q, k, v, q_meta, k_meta)
    if chunk <= 0:
        raise ValueError(f"attention chunk must be positive, got {chunk}")
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cq, ck = min(chunk, tq), min(chunk, tk)
    pq, pk = (-tq) % cq, (-tk) % ck
    nq, nk = (tq + pq) // cq, (tk + pk) // ck
    scale = d ** -0.5

    qg = _pad_axis1(_group(q, hkv), pq)
    qm = q_meta.pad(pq)
    k_, v_ = _pad_axis1(k, pk), _pad_axis1(v, pk)
    km = k_meta.pad(pk)

    # blocks on a leading axis: queries [nq, B, cq, Hkv, G, D], keys [nk, B, ck, Hkv, D]
    q_blocks = jnp.moveaxis(qg.reshape(b, nq, cq, hkv, g, d), 1, 0)
    qm_blocks = TokenMeta(*(jnp.moveaxis(a.reshape(b, nq, cq), 1, 0) for a in qm))
    k_blocks = jnp.moveaxis(k_.reshape(b, nk, ck, hkv, d), 1, 0)
    v_blocks = jnp.moveaxis(v_.reshape(b, nk, ck, hkv, d), 1, 0)
    km_blocks = TokenMeta(*(jnp.moveaxis(a.reshape(b, nk, ck), 1, 0) for a in km))

    def one_query_block(args):
        qb, qmb = args

        def live_block(carry, kb, vb, mask):
            m, l, acc = carry
            s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kb, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None]) * mask
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            acc = acc * corr[..., None] + pv
            return m_new, l, acc

        def step(carry, xs):
            kb, vb, kmb = xs
            mask = allowed(qmb, kmb)[:, None, None]
            if not skip_masked:
                return live_block(carry, kb, vb, mask), None
            # A key block that no query of this block may see (above the causal diagonal, another
            # document, a hidden noise split, padding) leaves (m, l, acc) unchanged: skip its matmuls.
            carry = jax.lax.cond(jnp.any(mask), live_block, lambda c, *_: c, carry, kb, vb, mask)
            return carry, None

        init = (jnp.full((b, hkv, g, cq), _NEG, jnp.float32), jnp.zeros((b, hkv, g, cq), jnp.float32),
                jnp.zeros((b, hkv, g, cq, d), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init,
                                      (k_blocks, v_blocks, km_blocks))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # fully masked (pad) rows: exactly 0
        return jnp.moveaxis(out, 3, 1)  # [B, cq, Hkv, G, D]

    # Remat per query block: the backward pass keeps only each block's inputs and recomputes its key
    # scan, so saved residuals are O(T·D), not O(T²·D/chunk) (measured: 8 GiB -> see docs/model.md at 16k).
    out = jax.lax.map(jax.checkpoint(one_query_block, prevent_cse=False), (q_blocks, qm_blocks))  # [nq,B,cq,Hkv,G,D]
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * cq, hq, d)[:, :tq]
    return out.astype(q.dtype)


def live_block_fraction(q_meta: TokenMeta, k_meta: TokenMeta, *, chunk: int) -> float:
    """Fraction of (pack, query block, key block) triples ``chunked_attention`` computes (the others are
    skipped): a block is live when its mask has any True. Host-side (numpy), for FLOP accounting; one
    pack at a time so no ``[B, T, T]`` array is formed."""
    qa = [np.asarray(a) for a in q_meta]
    ka = [np.asarray(a) for a in k_meta]
    tq, tk = qa[0].shape[1], ka[0].shape[1]
    cq, ck = min(chunk, tq), min(chunk, tk)
    nq, nk = -(-tq // cq), -(-tk // ck)
    live = 0
    for b in range(qa[0].shape[0]):
        mask = np.asarray(allowed(TokenMeta(*(a[b:b + 1] for a in qa)), TokenMeta(*(a[b:b + 1] for a in ka))))[0]
        mask = np.pad(mask, ((0, nq * cq - tq), (0, nk * ck - tk)))
        live += int(mask.reshape(nq, cq, nk, ck).any(axis=(1, 3)).sum())
    return live / (qa[0].shape[0] * nq * nk)


def attention_blocks(model_cfg) -> tuple[int, int]:
    """``(model.attention_block_q, model.attention_block_kv)`` of the Pallas kernel."""
    blocks = (int(model_cfg.attention_block_q), int(model_cfg.attention_block_kv))
    if min(blocks) <= 0:
        raise ValueError(f"model.attention_block_q/attention_block_kv must be positive, got {blocks}")
    return blocks


def target_platform() -> str:
    """The platform the traced program is for: the kernel mesh's devices (compile mode on a CPU host
    targets abstract TPU devices) or else the default backend."""
    ctx = kernel_sharding()
    if ctx is not None:
        return ctx[0].devices.flat[0].platform
    return jax.default_backend()


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``pallas`` on TPU where the kernel can run (under the train step's ``shard_map``, or on
    a single device), else ``chunked``; other names unchanged (checked). A multi-device program outside
    the train step (sharded inference) keeps ``chunked``: XLA does not partition a Mosaic kernel."""
    if impl not in IMPLS:
        raise ValueError(f"unknown model.attention_impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        runnable = kernel_sharding() is not None or jax.device_count() == 1
        return "pallas" if target_platform() == "tpu" and runnable else "chunked"
    return impl


def pallas_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, blocks: tuple[int, int],
                     name: str = "bagel_flash"):
    """The Pallas kernel (sgt_jax/models/kernels/flash_bagel.py): Mosaic on TPU, the Pallas interpreter
    elsewhere (slow; tests). Inside the train step (``layers.kernel_sharding`` set) it runs under
    ``shard_map`` (a Mosaic kernel is not partitioned automatically): batch and heads split as the
    activation rules say for q/k/v, the sequence whole on each device."""

    _check(q, k, v, q_meta, k_meta)
    run = functools.partial(flash_bagel.flash_attention, block_q=int(blocks[0]), block_k=int(blocks[1]),
                            interpret=target_platform() != "tpu", name=name)
    ctx = kernel_sharding()
    if ctx is None:
        return run(q, k, v, q_meta, k_meta)
    mesh, spec_of = ctx
    names = ("batch", None, "act_heads", None)
    qs, ks = spec_of(names, q.shape), spec_of(names, k.shape)
    heads = qs[2] if qs[2] == ks[2] else None  # GQA groups stay whole only if both split alike
    qs, ks = P(qs[0], None, heads, None), P(qs[0], None, heads, None)
    ms = (P(qs[0], None),) * 4

    def body(q, k, v, qm, km):
        return run(q, k, v, TokenMeta(*qm), TokenMeta(*km))

    return jax.shard_map(body, mesh=mesh, in_specs=(qs, ks, ks, ms, ms), out_specs=qs,
                         check_vma=False)(q, k, v, tuple(q_meta), tuple(k_meta))


def attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, impl: str, chunk: int = 512,
              blocks: tuple[int, int] = (512, 512)):
    """Dispatch on ``model.attention_impl``; scale ``1/sqrt(head_dim)``; output in q's dtype.
    ``chunk``: the ``chunked`` block; ``blocks``: the Pallas kernel's (query, key) blocks."""
    impl = resolve_impl(impl)
    if impl == "dense":
        return dense_attention(q, k, v, q_meta, k_meta)
    if impl == "chunked":
        return chunked_attention(q, k, v, q_meta, k_meta, chunk=chunk)
    return pallas_attention(q, k, v, q_meta, k_meta, blocks=blocks)
