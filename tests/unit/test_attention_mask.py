"""The BAGEL attention rule from metadata vs a brute-force reading of ByteDance-Seed/Bagel `data/data_utils.py`, and the two
attention implementations (dense, chunked) against each other and a numpy softmax reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.models import attention as A
from sgt_jax.models.attention import TokenMeta


def random_pack(rng, total):
    """A pack in ORIGINAL order: list of (doc, split, mode) per token, then pad (None) to ``total``."""
    toks, split_id = [], 0
    for doc in range(rng.integers(1, 4)):
        for _ in range(rng.integers(1, 5)):
            length, mode = int(rng.integers(1, 6)), int(rng.integers(0, 3))
            if len(toks) + length > total:
                break
            toks += [(doc, split_id, mode)] * length
            split_id += 1
    return toks + [None] * (total - len(toks))


def brute_force_mask(toks):
    """§2.4 in words: same sample; q >= k or same split in full/noise mode; never a foreign noise split."""
    n = len(toks)
    m = np.zeros((n, n), bool)
    for qi, q in enumerate(toks):
        for ki, k in enumerate(toks):
            if q is None or k is None or q[0] != k[0]:
                continue
            same_split = q[1] == k[1]
            ok = qi >= ki or (same_split and q[2] in (A.FULL, A.NOISE))
            if k[2] == A.NOISE and not same_split:
                ok = False
            m[qi, ki] = ok
    return m


def meta_arrays(toks, perm):
    """Physically permuted metadata: position p holds original token perm[p]; order = original index."""
    doc, split, mode, order = [], [], [], []
    for p in perm:
        t = toks[p]
        if t is None:
            doc.append(-1), split.append(-1), mode.append(0), order.append(0)
        else:
            doc.append(t[0]), split.append(t[1]), mode.append(t[2]), order.append(p)
    return [np.asarray(a, np.int32) for a in (doc, split, mode, order)]


def make_batch(seed, b=3, total=24):
    rng = np.random.default_rng(seed)
    metas, masks = [], []
    for _ in range(b):
        toks = random_pack(rng, total)
        perm = rng.permutation(total)
        metas.append(meta_arrays(toks, perm))
        masks.append(brute_force_mask(toks)[np.ix_(perm, perm)])
    meta = TokenMeta(*(jnp.asarray(np.stack([m[i] for m in metas])) for i in range(4)))
    return meta, np.stack(masks)


def qkv(seed, b, tq, tk, hq=4, hkv=2, d=8):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in ((b, tq, hq, d), (b, tk, hkv, d), (b, tk, hkv, d)))


allowed_jit = jax.jit(A.allowed)
dense_jit = jax.jit(A.dense_attention, static_argnames=("return_probs",))
attention_jit = jax.jit(A.attention, static_argnames=("impl", "chunk"))


def numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            s = q[bi, :, h] @ k[bi, :, h // g].T / np.sqrt(d)
            for i in range(tq):
                keys = mask[bi, i]
                if keys.any():
                    w = np.exp(s[i, keys] - s[i, keys].max())
                    out[bi, i, h] = (w / w.sum()) @ v[bi, keys, h // g]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_mask_rule_matches_brute_force_on_reordered_packs(seed):
    meta, expected = make_batch(seed, b=8)  # 40 random layouts in all
    got = np.asarray(allowed_jit(meta, meta))
    np.testing.assert_array_equal(got, expected)


def test_mask_examples_from_the_spec():
    # one doc: text(causal, 2) | noisy target (noise, 2) | clean copy (full, 2) | text (causal, 1)
    toks = [(0, 0, 0)] * 2 + [(0, 1, 2)] * 2 + [(0, 2, 1)] * 2 + [(0, 3, 0)]
    m = brute_force_mask(toks)
    meta = TokenMeta(*(jnp.asarray(a[None]) for a in meta_arrays(toks, np.arange(7))))
    got = np.asarray(A.allowed(meta, meta))[0]
    np.testing.assert_array_equal(got, m)
    assert got[2, 3] and got[3, 2]  # noise block bidirectional inside
    assert not got[4, 2] and not got[6, 3]  # later tokens never see the noise block
    assert got[4, 5] and got[6, 5]  # full block bidirectional, visible later
    assert not got[0, 1] and got[1, 0]  # text causal


def test_dense_matches_numpy_reference_and_pad_rows_are_zero():
    meta, mask = make_batch(100)
    q, k, v = qkv(0, 3, 24, 24)
    out, probs = dense_jit(q, k, v, meta, meta, return_probs=True)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    pad = np.asarray(meta.doc) < 0
    assert pad.any(), "layout generator should produce pad tokens"
    assert np.all(np.asarray(out)[pad] == 0.0)
    rows = np.asarray(probs).sum(-1)  # [B, H, T]
    np.testing.assert_allclose(rows.transpose(0, 2, 1)[~pad], 1.0, atol=1e-5)


def test_permuting_tokens_with_metadata_permutes_outputs():
    meta, _ = make_batch(7, b=2)
    q, k, v = qkv(1, 2, 24, 24)
    perm = np.random.default_rng(0).permutation(24)
    out = dense_jit(q, k, v, meta, meta)
    pmeta = TokenMeta(*(a[:, perm] for a in meta))
    pout = dense_jit(q[:, perm], k[:, perm], v[:, perm], pmeta, pmeta)
    np.testing.assert_allclose(np.asarray(pout), np.asarray(out)[:, perm], atol=1e-6)


def test_chunked_equals_dense_forward_and_grad(chunk=5):
    meta, _ = make_batch(11)
    q, k, v = qkv(2, 3, 24, 24)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    dense = lambda q, k, v: A.attention(q, k, v, meta, meta, impl="dense")  # noqa: E731
    chunked = lambda q, k, v: A.attention(q, k, v, meta, meta, impl="chunked", chunk=chunk)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(chunked)(q, k, v)), np.asarray(jax.jit(dense)(q, k, v)),
                               atol=1e-5, rtol=1e-5)
    gd = jax.jit(jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2)))(q, k, v)
    gc = jax.jit(jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(gc, gd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_cache_keys_with_their_own_metadata(impl):
    """Queries = the last 9 tokens, keys = [first 15 (a cache) ‖ last 9]: same as the full computation."""
    meta, _ = make_batch(21, b=2)
    q, k, v = qkv(3, 2, 24, 24)
    full = dense_jit(q, k, v, meta, meta)
    new = meta.slice(15, 24)
    part = attention_jit(q[:, 15:], k, v, new, meta.slice(0, 15).concat(new), impl=impl, chunk=4)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full)[:, 15:], atol=1e-5)


def test_bad_inputs_are_named():
    meta, _ = make_batch(0, b=1)
    q, k, v = qkv(0, 1, 24, 24)
    with pytest.raises(ValueError, match="attention_impl"):
        A.attention(q, k, v, meta, meta, impl="flash")
    with pytest.raises(ValueError, match="metadata shapes"):
        A.dense_attention(q, k, v, meta.slice(0, 5), meta)


def causal_two_docs(b=2, total=24, pad=4):
    """Two causal documents in order, then padding: the blocks above the diagonal and across documents
    are dead."""
    n = (total - pad) // 2
    doc = np.r_[np.zeros(n), np.ones(n), -np.ones(pad)].astype(np.int32)
    split = np.r_[np.zeros(n), np.ones(n), -np.ones(pad)].astype(np.int32)
    order = np.r_[np.arange(n), np.arange(n), np.zeros(pad)].astype(np.int32)
    mode = np.zeros(total, np.int32)
    return TokenMeta(*(jnp.asarray(np.tile(a, (b, 1))) for a in (doc, split, mode, order)))


def test_live_block_fraction_counts_blocks_of_the_mask():
    meta = causal_two_docs()
    # chunk 4 on 24 tokens: 6x6 blocks; doc 0 = tokens 0-9, doc 1 = 10-19, pad 20-23. Live block pairs:
    # doc 0 causal over blocks 0-2 (6 pairs), doc 1 over blocks 2-4 (6), minus the pair (2, 2) counted twice.
    assert A.live_block_fraction(meta, meta, chunk=4) == pytest.approx(11 / 36)
    mixed, masks = make_batch(5)
    brute = np.mean([m.reshape(6, 4, 6, 4).any(axis=(1, 3)).mean() for m in masks])
    assert A.live_block_fraction(mixed, mixed, chunk=4) == pytest.approx(brute)


def test_chunked_skips_dead_blocks_and_changes_nothing():
    """Skipping dead blocks is exact: same forward bits, same gradients. NaN values in keys/values that
    only dead blocks read prove the skip happens (computing them would give 0 * NaN = NaN)."""
    meta = causal_two_docs()
    q, k, v = qkv(7, 2, 24, 24)
    run = jax.jit(A.chunked_attention, static_argnames=("chunk", "skip_masked"))
    skip = run(q, k, v, meta, meta, chunk=4, skip_masked=True)
    full = run(q, k, v, meta, meta, chunk=4, skip_masked=False)
    np.testing.assert_array_equal(np.asarray(skip), np.asarray(full))

    def loss(skip_masked, q, k, v):
        return jnp.sum(jnp.sin(A.chunked_attention(q, k, v, meta, meta, chunk=4, skip_masked=skip_masked)))

    g_skip = jax.jit(jax.grad(lambda *a: loss(True, *a), argnums=(0, 1, 2)))(q, k, v)
    g_full = jax.jit(jax.grad(lambda *a: loss(False, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_skip, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)

    poisoned_v = v.at[:, 20:].set(jnp.nan)  # the pad block (keys 20-23) is dead for every query block
    assert np.isnan(np.asarray(run(q, k, poisoned_v, meta, meta, chunk=4, skip_masked=False))).any()
    np.testing.assert_array_equal(np.asarray(run(q, k, poisoned_v, meta, meta, chunk=4, skip_masked=True)),
                                  np.asarray(skip))
