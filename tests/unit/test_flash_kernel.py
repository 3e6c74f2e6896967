"""The Pallas BAGEL flash-attention kernel (sgt_jax/models/kernels/flash_bagel.py) in interpret mode on
CPU against the dense reference: forward and gradients on many random layouts, one compiled shape.

Shapes stay fixed (T = 40, not a multiple of the 16-token blocks; 4 query heads on 2 KV heads) and
the metadata varies, so one compilation serves every layout (interpret mode compiles slowly)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax import compile as C
from sgt_jax.models import attention as A
from sgt_jax.models.attention import TokenMeta
from sgt_jax.models.kernels import flash_bagel as K

B, T, HQ, HKV, D, BLOCK = 2, 40, 4, 2, 8, 16


def bagel_layout(rng, shuffle: bool):
    """One pack in original order (documents of causal/full/noise splits, one-token splits included,
    pads at the end), physically shuffled or not: per-token (doc, split, mode, order) rows."""
    rows, split = [], 0
    for doc in range(int(rng.integers(1, 5))):
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.choice([1, 1, 2, 5, 9, 14]))
            if len(rows) + n > T:
                break
            rows += [(doc, split, int(rng.integers(0, 3)))] * n
            split += 1
    meta = [(d, s, m, i) for i, (d, s, m) in enumerate(rows)] + [(-1, -1, 0, 0)] * (T - len(rows))
    meta = np.asarray(meta, np.int32)
    return meta[rng.permutation(T)] if shuffle else meta


def vit_layout(rng):
    """The ViT's use: image id as document, one full split per image, pads (-1) at the end."""
    sizes = rng.integers(1, 16, size=int(rng.integers(1, 4)))
    ids = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])[:T]
    ids = np.concatenate([ids, np.full(T - len(ids), -1)]).astype(np.int32)
    return np.stack([ids, ids, np.full(T, A.FULL), np.zeros(T)], axis=1).astype(np.int32)


def layouts(n, seed=0):
    rng = np.random.default_rng(seed)
    kinds = ["shuffled", "ordered", "vit", "ordered"]
    for i in range(n):
        packs = []
        for b in range(B):
            kind = kinds[(i + b) % len(kinds)]
            if i == 0 and b == 1:  # a pack of pads only: every row fully masked
                packs.append(np.asarray([(-1, -1, 0, 0)] * T, np.int32))
            elif kind == "vit":
                packs.append(vit_layout(rng))
            else:
                packs.append(bagel_layout(rng, shuffle=kind == "shuffled"))
        arr = np.stack(packs)  # [B, T, 4]
        yield TokenMeta(*(jnp.asarray(arr[..., f]) for f in range(4)))


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, HQ, D), (B, T, HKV, D), (B, T, HKV, D), (B, T, HQ, D))
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def _value_and_grads(fn):
    def run(q, k, v, w, meta):
        f = lambda q, k, v: jnp.sum(fn(q, k, v, meta, meta) * w)
        return fn(q, k, v, meta, meta), jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    return jax.jit(run)


kernel = _value_and_grads(lambda q, k, v, qm, km: K.flash_attention(q, k, v, qm, km, block_q=BLOCK, block_k=BLOCK,
                                                                    interpret=True))
dense = _value_and_grads(A.dense_attention)
allowed = jax.jit(A.allowed)
liveness = jax.jit(K.block_liveness, static_argnums=(2, 3))


@pytest.mark.slow  # one interpret-mode compile of forward + backward (~30-40 s on CPU), then 60 cheap layouts
def test_forward_and_gradients_equal_dense_on_60_layouts():
    q, k, v, w = _inputs()
    fractions = []
    for meta in layouts(60):
        out, grads = kernel(q, k, v, w, meta)
        ref, ref_grads = dense(q, k, v, w, meta)
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
        for g, r, name in zip(grads, ref_grads, "qkv"):
            np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-5, err_msg=f"d{name}")
        dead_rows = ~np.asarray(allowed(meta, meta)).any(-1)  # pads: output and dq exactly 0
        assert np.all(np.asarray(out)[dead_rows] == 0) and np.all(np.asarray(grads[0])[dead_rows] == 0)
        fractions.append(A.live_block_fraction(meta, meta, chunk=BLOCK))
    # the layouts exercise the skip: some block pairs dead, some packs fully live
    assert min(fractions) < 0.5 and max(fractions) > 0.8


def test_block_table_is_the_brute_force_liveness():
    for meta in layouts(8, seed=3):
        qm = meta.pad((-T) % BLOCK)
        live = np.asarray(liveness(qm, qm, BLOCK, BLOCK))
        mask = np.asarray(allowed(qm, qm))
        n = qm.doc.shape[1] // BLOCK
        np.testing.assert_array_equal(live, mask.reshape(B, n, BLOCK, n, BLOCK).any(axis=(2, 4)))
        idx, cnt = (np.asarray(a) for a in K._compact(jnp.asarray(live)))
        idx = idx.reshape(B, n, n)
        for b in range(B):
            for i in range(n):
                c = int(cnt[b * n + i])
                assert list(idx[b, i, :c]) == list(np.flatnonzero(live[b, i]))
                assert len(set(idx[b, i, c:])) <= 1  # dead slots repeat one index: no new DMA


def test_dead_blocks_are_never_read():
    """NaN keys/values in a key block no query may see (all pads) do not reach outputs or gradients:
    the grid never loads or computes that block (dense attention would multiply 0 by NaN)."""
    q, k, v, w = _inputs(seed=2)
    meta = next(layouts(1, seed=5))
    meta = TokenMeta(*(a.at[:, 32:].set(-1 if f < 2 else 0) for f, a in enumerate(meta)))  # block 2: pads
    k_nan, v_nan = k.at[:, 32:].set(jnp.nan), v.at[:, 32:].set(jnp.nan)
    out, grads = kernel(q, k_nan, v_nan, w, meta)
    ref, ref_grads = dense(q, k, v, w, meta)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grads[0], atol=5e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(grads[1])[:, :32]).all() and np.isfinite(np.asarray(grads[2])[:, :32]).all()


def test_dispatch_and_bad_blocks():
    q, k, v, _ = _inputs()
    meta = next(layouts(1, seed=7))
    assert A.resolve_impl("auto") == "chunked"  # CPU
    with pytest.raises(ValueError, match="attention_impl"):
        A.resolve_impl("flash")
    with pytest.raises(ValueError, match="multiple of 128"):
        K.flash_attention(q, k, v, meta, meta, block_q=16, block_k=64, interpret=False)


def test_vit_image_attention_through_the_kernel():
    """siglip_navit.image_attention with impl="pallas": the kernel with the image id as the document
    equals the dense block-diagonal attention on real patches (pads: 0 instead of a pad-only softmax)."""
    from sgt_jax.models.siglip_navit import image_attention

    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 24, 2, 8)), jnp.float32) for _ in range(3))
    ids = jnp.asarray([[0] * 7 + [1] * 12 + [2] * 2 + [-1] * 3], jnp.int32)
    out = image_attention(q, k, v, ids, impl="pallas", blocks=(8, 8))
    ref = image_attention(q, k, v, ids, impl="dense")
    np.testing.assert_allclose(out[:, :21], ref[:, :21], atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(out[:, 21:]) == 0)


def test_remat_policy_can_save_the_kernel_residuals():
    """The forward kernel is recomputed in the backward pass under full remat, and not when the policy saves
    its output and log-sum-exp (tags ``attn_out``, ``attn_lse``): the forward call is a DCE-able jit call."""
    from sgt_jax.models import remat

    q, k, v, w = _inputs()
    meta = next(layouts(1, seed=5))

    def layer(q, k, v):
        return jnp.sum(K.flash_attention(q, k, v, meta, meta, block_q=BLOCK, block_k=BLOCK, interpret=True) * w)

    def kernel_calls(policy):
        jaxpr = jax.make_jaxpr(jax.grad(remat.remat(layer, policy), argnums=(0, 1, 2)))(q, k, v)
        names = []

        def walk(jx):
            for eqn in jx.eqns:
                if eqn.primitive.name == "pallas_call":
                    names.append(str(eqn.params["name"]).rsplit("_", 1)[-1])
                for sub in C._sub_jaxprs(eqn):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return sorted(names)

    assert kernel_calls("full") == ["dkv", "dq", "fwd", "fwd"]
    assert kernel_calls("qkv_out") == kernel_calls("none") == ["dkv", "dq", "fwd"]
