"""Pallas TPU flash attention that evaluates BAGEL's packed-attention rule inside the kernel.

Why our own kernel (docs/attention_kernel.md): jax's splash attention takes its mask as a static numpy
array or a function of the (query, key) *positions*, plus segment ids compared for equality; BAGEL's rule
depends on four per-token fields of physically reordered tokens (doc, split, mode, order) that change
every step, so it fits neither. tokamax's dynamic splash takes the mask as a dense ``[Tq, Tk]`` array
(O(T²) memory per call). Here the kernel receives the metadata blocks and evaluates
``mask_rule.rule`` per (query block, key block) itself.

Structure (the splash idea, with a mask that is data):
- ``block_liveness``: ``[B, nq, nk]`` bool, True where any (query, key) pair of the block pair is allowed,
  computed on device from the metadata each call (query block by query block: memory O(bq·T)).
- ``_compact``: per query block, the live key blocks first (ascending), then the last live index
  repeated; and a count. Passed by scalar prefetch: the key/value index maps read it, so a dead grid step
  repeats the previous block index (no DMA) and its body is skipped (``pl.when``). The backward's
  dk/dv kernel uses the transposed table (live query blocks per key block).
- Forward: online softmax over the live key blocks, fp32 scores/accumulators, bf16 (input dtype)
  operands; outputs ``o`` and the log-sum-exp (lane-broadcast, as the TPU layout wants).
- Backward (``jax.custom_vjp``): residuals are q, k, v, o and the log-sum-exp only (o and the
  log-sum-exp tagged ``attn_out`` / ``attn_lse`` for the remat policies); a dq kernel (grid like the
  forward) and a dk/dv kernel (grid over key blocks, query heads of the group, live query blocks).
- GQA: query head h reads KV head ``h // group`` through the index map; dk/dv accumulate over the group,
  so K/V are never repeated in memory.
- Rows with no visible key (pads) output exactly 0 and get zero gradients.

Layout inside: ``[B, H, T, D]``; sequence lengths are padded to the blocks with pad metadata (doc -1),
and on TPU the head dim to a multiple of 128 with zeros (does not change q·k or the kept columns of o).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sgt_jax.models.mask_rule import TokenMeta, rule

_NEG = -1e30  # as attention._NEG: finite, fully masked rows never produce NaN
_LANES = 128
_SUBLANES = 8


def _pad_to(x, axis, mult, value=0):
    n = (-x.shape[axis]) % mult
    if n == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n)
    return jnp.pad(x, pad, constant_values=value)


def block_liveness(q_meta: TokenMeta, k_meta: TokenMeta, bq: int, bk: int) -> jax.Array:
    """``[B, nq, nk]`` bool: does any query of block i see any key of block j. Lengths must be multiples
    of the blocks. Evaluated one query block at a time (``lax.map``), so no ``[T, T]`` array exists."""
    b, tq = q_meta.doc.shape
    tk = k_meta.doc.shape[1]
    nq, nk = tq // bq, tk // bk
    q_blocks = [jnp.moveaxis(a.reshape(b, nq, bq), 1, 0) for a in q_meta]
    k_fields = [a[:, None, :] for a in k_meta]

    def one(qb):
        mask = rule(*(a[:, :, None] for a in qb), *k_fields)  # [B, bq, Tk]
        return mask.reshape(b, bq, nk, bk).any(axis=(1, 3))

    return jnp.moveaxis(jax.lax.map(one, q_blocks), 0, 1)


def _compact(live: jax.Array):
    """``live [B, R, C]`` -> (indices ``[B·R·C]`` int32: each row's live columns ascending, then its last
    live column repeated (0 for an empty row); counts ``[B·R]`` int32). Flat for SMEM."""
    c = live.shape[-1]
    srt = jnp.sort(jnp.where(live, jnp.arange(c, dtype=jnp.int32), c), axis=-1)
    cnt = live.sum(axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(srt, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
    idx = jnp.where(srt == c, jnp.where(cnt[..., None] > 0, last, 0), srt)
    return idx.reshape(-1).astype(jnp.int32), cnt.reshape(-1)


def _mask(qm_ref, km_ref, bk: int):
    """The rule for one block pair: query fields ``qm_ref [4, bq, lanes]`` (lane-broadcast), key fields
    ``km_ref [4, 8, bk]`` (sublane-broadcast) -> ``[bq, bk]`` bool."""
    rep = bk // qm_ref.shape[-1]
    qf = [jnp.tile(qm_ref[f], (1, rep)) if rep > 1 else qm_ref[f] for f in range(4)]
    kf = [km_ref[f, 0:1, :] for f in range(4)]
    return rule(*qf, *kf)


def _tile(x, bk: int):
    rep = bk // x.shape[-1]
    return jnp.tile(x, (1, rep)) if rep > 1 else x


_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, scale, nq, nk, bk):
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _():
        m_sc[...] = jnp.full_like(m_sc, _NEG)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(s < cnt_ref[b * nq + i])
    def _():
        mask = _mask(qm_ref, km_ref, bk)
        sc = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(mask, sc, _NEG)
        m_prev = m_sc[...]  # [bq, lanes], all lanes equal
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(sc - _tile(m_new, bk)), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_sc[...] = corr * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        m_sc[...] = m_new
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_sc[...] = corr[:, :1] * acc_sc[...] + pv

    @pl.when(s == nk - 1)
    def _():
        l = l_sc[...]
        live = l > 0
        inv = jnp.where(live, 1.0 / jnp.where(live, l, 1.0), 0.0)
        o_ref[...] = (acc_sc[...] * inv[:, :1]).astype(o_ref.dtype)  # dead rows: exactly 0
        lse_ref[...] = jnp.where(live, m_sc[...] + jnp.log(jnp.where(live, l, 1.0)), 0.0)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qm_ref, km_ref, dq_ref, dq_sc,
               *, scale, nq, nk, bk):
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(s < cnt_ref[b * nq + i])
    def _():
        mask = _mask(qm_ref, km_ref, bk)
        sc = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        p = jnp.where(mask, jnp.exp(sc - _tile(lse_ref[...], bk)), 0.0)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _tile(di_ref[...], bk))
        dq_sc[...] += jnp.dot(ds.astype(k_ref.dtype), k_ref[...], preferred_element_type=jnp.float32) * scale

    @pl.when(s == nk - 1)
    def _():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qm_ref, km_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, scale, nk, nq, group, bk):
    b, j, g, s = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (s == 0))
    def _():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(s < cnt_ref[b * nk + j])
    def _():
        mask = _mask(qm_ref, km_ref, bk)
        q, do = q_ref[...], do_ref[...]
        sc = jax.lax.dot_general(q, k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        p = jnp.where(mask, jnp.exp(sc - _tile(lse_ref[...], bk)), 0.0)
        dv_sc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _tile(di_ref[...], bk))
        dk_sc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * scale

    @pl.when((g == group - 1) & (s == nq - 1))
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static call configuration (hashable, a nondiff argument of the custom VJP)."""

    scale: float
    bq: int
    bk: int
    group: int
    lanes: int
    interpret: bool
    name: str


def _params(interpret, sem):
    return dict(interpret=interpret, compiler_params=pltpu.CompilerParams(dimension_semantics=sem))


def _forward(cfg, q, k, v, qm, km, fidx, fcnt):
    bsz, hq, tq, d = q.shape
    tk = k.shape[2]
    bq, bk, lanes, grp = cfg.bq, cfg.bk, cfg.lanes, cfg.group
    nq, nk = tq // bq, tk // bk
    kv = lambda b, h, i, s, idx, cnt: (b, h // grp, idx[(b * nq + i) * nk + s], 0)
    qmap = lambda b, h, i, s, idx, cnt: (b, h, i, 0)
    specs = [
        pl.BlockSpec((None, None, bq, d), qmap),
        pl.BlockSpec((None, None, bk, d), kv),
        pl.BlockSpec((None, None, bk, d), kv),
        pl.BlockSpec((None, 4, bq, lanes), lambda b, h, i, s, idx, cnt: (b, 0, i, 0)),
        pl.BlockSpec((None, 4, _SUBLANES, bk), lambda b, h, i, s, idx, cnt: (b, 0, 0, idx[(b * nq + i) * nk + s])),
    ]
    kernel = functools.partial(_fwd_kernel, scale=cfg.scale, nq=nq, nk=nk, bk=bk)
    # Wrapped in ``jax.jit``: jax never dead-code-eliminates a bare ``pallas_call`` (its DCE rule keeps
    # every call), so under ``jax.checkpoint`` the recomputed forward would stay in the backward pass even
    # when a remat policy saves ``o`` and the log-sum-exp; a jit call whose outputs are unused is removed.
    o, lse = jax.jit(pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(bsz, hq, nq, nk), in_specs=specs,
            out_specs=[pl.BlockSpec((None, None, bq, d), qmap), pl.BlockSpec((None, None, bq, lanes), qmap)],
            scratch_shapes=[pltpu.VMEM((bq, lanes), jnp.float32), pltpu.VMEM((bq, lanes), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, hq, tq, lanes), jnp.float32)],
        cost_estimate=pl.CostEstimate(flops=4 * bsz * hq * tq * tk * d, transcendentals=bsz * hq * tq * tk,
                                      bytes_accessed=0),
        name=f"{cfg.name}_fwd",
        **_params(cfg.interpret, ("parallel", "parallel", "parallel", "arbitrary")),
    ))(fidx, fcnt, q, k, v, qm, km)
    return o, lse[..., 0]


def _backward(cfg, q, k, v, qm, km, fidx, fcnt, bidx, bcnt, o, lse, do):
    bsz, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bq, bk, lanes, grp = cfg.bq, cfg.bk, cfg.lanes, cfg.group
    nq, nk = tq // bq, tk // bk
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    lse_l = jnp.broadcast_to(lse[..., None], (*lse.shape, lanes))
    di_l = jnp.broadcast_to(di[..., None], (*di.shape, lanes))

    # dq: grid like the forward
    kv = lambda b, h, i, s, idx, cnt: (b, h // grp, idx[(b * nq + i) * nk + s], 0)
    qmap = lambda b, h, i, s, idx, cnt: (b, h, i, 0)
    row = pl.BlockSpec((None, None, bq, lanes), qmap)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.scale, nq=nq, nk=nk, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(bsz, hq, nq, nk),
            in_specs=[pl.BlockSpec((None, None, bq, d), qmap), pl.BlockSpec((None, None, bk, d), kv),
                      pl.BlockSpec((None, None, bk, d), kv), pl.BlockSpec((None, None, bq, d), qmap), row, row,
                      pl.BlockSpec((None, 4, bq, lanes), lambda b, h, i, s, idx, cnt: (b, 0, i, 0)),
                      pl.BlockSpec((None, 4, _SUBLANES, bk),
                                   lambda b, h, i, s, idx, cnt: (b, 0, 0, idx[(b * nq + i) * nk + s]))],
            out_specs=pl.BlockSpec((None, None, bq, d), qmap),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        cost_estimate=pl.CostEstimate(flops=6 * bsz * hq * tq * tk * d, transcendentals=bsz * hq * tq * tk,
                                      bytes_accessed=0),
        name=f"{cfg.name}_dq",
        **_params(cfg.interpret, ("parallel", "parallel", "parallel", "arbitrary")),
    )(fidx, fcnt, q, k, v, do, lse_l, di_l, qm, km)

    # dk, dv: grid over key blocks, then the query heads of the group, then the live query blocks
    qb = lambda b, h, j, g, s, idx, cnt: (b, h * grp + g, idx[(b * nk + j) * nq + s], 0)
    kmap = lambda b, h, j, g, s, idx, cnt: (b, h, j, 0)
    qrow = pl.BlockSpec((None, None, bq, lanes), qb)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.scale, nk=nk, nq=nq, group=grp, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(bsz, hkv, nk, grp, nq),
            in_specs=[pl.BlockSpec((None, None, bq, d), qb), pl.BlockSpec((None, None, bk, d), kmap),
                      pl.BlockSpec((None, None, bk, d), kmap), pl.BlockSpec((None, None, bq, d), qb), qrow, qrow,
                      pl.BlockSpec((None, 4, bq, lanes),
                                   lambda b, h, j, g, s, idx, cnt: (b, 0, idx[(b * nk + j) * nq + s], 0)),
                      pl.BlockSpec((None, 4, _SUBLANES, bk), lambda b, h, j, g, s, idx, cnt: (b, 0, 0, j))],
            out_specs=[pl.BlockSpec((None, None, bk, d), kmap), pl.BlockSpec((None, None, bk, d), kmap)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cost_estimate=pl.CostEstimate(flops=8 * bsz * hq * tq * tk * d, transcendentals=bsz * hq * tq * tk,
                                      bytes_accessed=0),
        name=f"{cfg.name}_dkv",
        **_params(cfg.interpret, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    )(bidx, bcnt, q, k, v, do, lse_l, di_l, qm, km)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, qm, km, fidx, fcnt, bidx, bcnt):
    return _forward(cfg, q, k, v, qm, km, fidx, fcnt)[0]


def _flash_fwd(cfg, q, k, v, qm, km, fidx, fcnt, bidx, bcnt):
    o, lse = _forward(cfg, q, k, v, qm, km, fidx, fcnt)
    # Named for the remat policies (sgt_jax/models/remat.py): saving these two spares the forward kernel's
    # recompute in the backward pass; q, k, v come back from the tensors tagged ``qkv`` by transposes.
    o, lse = checkpoint_name(o, "attn_out"), checkpoint_name(lse, "attn_lse")
    return o, (q, k, v, qm, km, fidx, fcnt, bidx, bcnt, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, qm, km, fidx, fcnt, bidx, bcnt, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, qm, km, fidx, fcnt, bidx, bcnt, o, lse, do)
    return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q: int, block_k: int,
                    interpret: bool = False, name: str = "bagel_flash"):
    """BAGEL-masked attention: ``q [B,Tq,Hq,D]``, ``k = v [B,Tk,Hkv,D]`` -> ``[B,Tq,Hq,D]`` in q's dtype.

    Equal to ``attention.dense_attention`` up to float rounding (tests/unit/test_flash_kernel.py).
    ``interpret`` runs the Pallas interpreter (CPU); otherwise the Mosaic TPU kernel, for which blocks must
    be multiples of 128 (``block_k``) and 8 (``block_q``). ``name`` tags the pallas_calls (the compile
    report counts their FLOPs by it, sgt_jax/compile.py).
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not divisible by kv heads {hkv}")
    bq, bk = min(block_q, _round_up(tq, 8)), min(block_k, _round_up(tk, 8 if interpret else _LANES))
    if not interpret and (bk % _LANES or bq % _SUBLANES):
        raise ValueError(f"model.attention_block_kv {bk} must be a multiple of {_LANES} and "
                         f"model.attention_block_q {bq} of {_SUBLANES} for the TPU kernel")
    lanes = _LANES if bk % _LANES == 0 else bk
    qm, km = _pad_meta(q_meta, bq), _pad_meta(k_meta, bk)
    qt = _pad_to(jnp.swapaxes(q, 1, 2), 2, bq)
    kt, vt = (_pad_to(jnp.swapaxes(x, 1, 2), 2, bk) for x in (k, v))
    if not interpret and d % _LANES:  # zero columns: q·k and the kept output columns are unchanged
        qt, kt, vt = (_pad_to(x, 3, _LANES) for x in (qt, kt, vt))
    live = block_liveness(qm, km, bq, bk)
    fidx, fcnt = _compact(live)
    bidx, bcnt = _compact(jnp.swapaxes(live, 1, 2))
    qm_arr = jnp.broadcast_to(jnp.stack(list(qm), axis=1)[..., None], (b, 4, qm.doc.shape[1], lanes))
    km_arr = jnp.broadcast_to(jnp.stack(list(km), axis=1)[:, :, None, :], (b, 4, _SUBLANES, km.doc.shape[1]))
    cfg = _Cfg(scale=float(d) ** -0.5, bq=bq, bk=bk, group=hq // hkv, lanes=lanes, interpret=bool(interpret),
               name=name)
    out = _flash(cfg, qt, kt, vt, qm_arr.astype(jnp.int32), km_arr.astype(jnp.int32), fidx, fcnt, bidx, bcnt)
    return jnp.swapaxes(out[:, :, :tq, :d], 1, 2)


def _round_up(n, m):
    return -(-n // m) * m


def _pad_meta(meta: TokenMeta, mult: int) -> TokenMeta:
    return meta.pad((-meta.doc.shape[1]) % mult)
