"""Qwen2 MoT behaviours: KV cache == full forward, scan == loop, remat/chunked do not change results,
freeze_und stops und gradients; the sin-cos and timestep embeddings against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.configs_util import load_config
from sgt_jax.models import posemb
from sgt_jax.models.attention import TokenMeta
from sgt_jax.models.qwen2_mot import KVCache, Qwen2MoT

T, U = 14, 9  # 9 und tokens then 5 gen tokens (physical layout)


def model_cfg(**over):
    cfg = load_config("configs/sgt_tiny.py").model
    cfg.llm.num_layers = 1  # one layer keeps compile time down; scan/loop/cache paths are the same code
    for k, v in over.items():
        cfg[k] = v
    return cfg


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, T, 64)), jnp.float32)
    # original order: text(4, causal) | image(5 gen latents + 2 und markers, full) | text(3, causal)
    # physical: und = text 0-3, marker 4, marker 10, text 11-13 ... then gen = 5..9
    order = np.array([0, 1, 2, 3, 4, 10, 11, 12, 13, 5, 6, 7, 8, 9])
    split = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1])
    mode = np.where(split == 1, 1, 0)
    rope = np.where(split == 0, order, np.where(split == 1, 4, order - 6))
    a = lambda v: jnp.asarray(v[None], jnp.int32)  # noqa: E731
    return x, TokenMeta(a(np.zeros(T, int)), a(split), a(mode), a(order)), a(rope)


def build(cfg, seed=0):
    return Qwen2MoT(cfg, rngs=nnx.Rngs(seed))


def jitted(m, **kw):
    """``m(x, meta, rope, **kw)`` under one jit (eager op-by-op dispatch is slow on CPU)."""
    graphdef, state = nnx.split(m)

    @jax.jit
    def f(state, x, meta, rope, cache):
        return nnx.merge(graphdef, state)(x, meta, rope, kv_cache=cache, return_kv=True, **kw)[:2]

    return lambda x, meta, rope, cache=None: f(state, x, meta, rope, cache)


@pytest.fixture(scope="module")
def reference():
    """The default model (scan, dense, no remat), its inputs and its full forward (compiled once)."""
    m = build(model_cfg())
    x, meta, rope = inputs()
    full, kv_full = jitted(m, num_und=U)(x, meta, rope)
    return m, (x, meta, rope), full, kv_full


def test_kv_cache_prefix_then_suffix_equals_full(reference):
    m, (x, meta, rope), full, kv_full = reference
    # prefix = the first text block (phys 0..3, und) + the image block (markers phys 4,5 und; latents 9..13 gen)
    pre = np.array([0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13])
    suf = np.array([6, 7, 8])
    take = lambda t, idx: jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:, idx]), t)  # noqa: E731
    _, kv_pre = jitted(m, num_und=6)(take(x, pre), take(meta, pre), take(rope, pre))
    cache = KVCache(kv_pre.k, kv_pre.v, kv_pre.meta)
    h_suf, kv_suf = jitted(m, num_und=3)(take(x, suf), take(meta, suf), take(rope, suf), cache)
    np.testing.assert_allclose(np.asarray(h_suf), np.asarray(full)[:, suf], atol=1e-5)
    np.testing.assert_allclose(np.asarray(kv_suf.k), np.asarray(kv_full.k)[:, :, suf], atol=1e-5)
    np.testing.assert_allclose(np.asarray(kv_pre.v), np.asarray(kv_full.v)[:, :, pre], atol=1e-5)
    with pytest.raises(ValueError, match="kv_cache"):
        m(take(x, suf), take(meta, suf), take(rope, suf), num_und=3, kv_cache=KVCache(jnp.concatenate([kv_pre.k] * 2), kv_pre.v, kv_pre.meta))


def _loss_and_grads(cfg, x, meta, rope):
    m = build(cfg)
    graphdef, state = nnx.split(m)

    @jax.jit
    def f(state):
        h, _, _ = nnx.merge(graphdef, state)(x, meta, rope, num_und=U)
        return jnp.sum(jnp.sin(h[:, :U])) + jnp.sum(h[:, U:] ** 2)

    return jax.value_and_grad(f)(state)


def test_scan_loop_remat_and_chunked_agree(reference):
    """Python loop + remat "full" + chunked attention give the scanned dense forward (same weights).
    (Gradient equality of chunked vs dense is tested in test_attention_mask.py; remat only changes
    what the backward pass stores.)"""
    _, (x, meta, rope), ref, ref_kv = reference
    over = dict(scan_layers=False, remat_policy="full", attention_impl="chunked", attention_chunk=4)
    got, got_kv = jitted(build(model_cfg(**over)), num_und=U)(x, meta, rope)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_kv.k), np.asarray(ref_kv.k), atol=1e-5)


def test_freeze_und_stops_und_gradients_only():
    x, meta, rope = inputs(2)
    _, g = _loss_and_grads(model_cfg(freeze_und=True), x, meta, rope)
    g = nnx.State(g).to_pure_dict() if not isinstance(g, dict) else g
    und = jax.tree.leaves(g["layers"]["und"])
    gen = jax.tree.leaves(g["layers"]["gen"])
    assert all(np.all(np.asarray(a) == 0) for a in und)
    assert np.all(np.asarray(g["norm"]["scale"]) == 0)
    assert any(np.abs(np.asarray(a)).max() > 0 for a in gen)


def test_sincos_matches_float64_table_layout():
    grid, dim = 5, 16
    table = posemb.sincos_2d_table_np(grid, dim)
    ids = jnp.arange(grid * grid)
    # exactly the float64 table rounded once: to fp32 (the official trainer) or bf16 (a BAGEL folder's copies)
    np.testing.assert_array_equal(np.asarray(posemb.sincos_2d(ids, grid, dim)), table.astype(np.float32))
    bf16 = posemb.sincos_2d(ids.reshape(5, 5), grid, dim, jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == (5, 5, dim)
    np.testing.assert_array_equal(np.asarray(bf16, np.float32).reshape(-1, dim),
                                  table.astype(np.float32).astype(jnp.bfloat16).astype(np.float32))
    r, c = 2, 3  # column in the first half, sin before cos inside each half
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    np.testing.assert_allclose(table[r * grid + c, :4], np.sin(c * omega))
    np.testing.assert_allclose(table[r * grid + c, 4:8], np.cos(c * omega))
    np.testing.assert_allclose(table[r * grid + c, 8:12], np.sin(r * omega))


def test_timestep_frequencies_cos_first_unscaled():
    t = jnp.asarray([0.0, 0.25, 1.0])
    f = np.asarray(posemb.timestep_frequencies(t, 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    want = np.concatenate([np.cos(np.asarray(t)[:, None] * freqs), np.sin(np.asarray(t)[:, None] * freqs)], 1)
    np.testing.assert_allclose(f, want, atol=1e-6)
    assert np.all(f[0, :4] == 1.0) and np.all(f[0, 4:] == 0.0)


def test_activation_sharding_hook_sees_named_activations(reference):
    from sgt_jax.models.layers import activation_sharding

    seen = []

    def record(x, names):
        seen.append((names, x.ndim))
        return x

    m, (x, meta, rope), plain, _ = reference
    with activation_sharding(record):
        hooked, _ = jitted(m, num_und=U)(x, meta, rope)
    np.testing.assert_array_equal(np.asarray(hooked), np.asarray(plain))
    names = {n for n, _ in seen}
    assert {("batch", "seq", "act_embed"), ("batch", "seq", "act_heads", None), ("batch", "seq", "act_mlp")} <= names
    assert all(len(n) == nd for n, nd in seen)


@pytest.fixture(scope="module")
def no_remat_grads():
    x, meta, rope = inputs(3)
    return _loss_and_grads(model_cfg(), x, meta, rope)[1]


@pytest.mark.parametrize("policy", ["full", "qkv_out_up", "qkv_out_offload_mlp", "offload_qkv_out"])
def test_remat_policy_same_gradients(policy, no_remat_grads):
    """Saving, offloading or recomputing changes what the backward pass stores, not the gradients. The
    tolerance is relative to the largest gradient: in this layout some leaves (the gen expert's q/o/MLP)
    have gradients ~1e-5 that cancel from O(1) terms, so fp32 rounding of a different evaluation order
    (~1e-6 absolute, for every policy including ``full``) is 10-25 % of those leaves' own scale."""
    x, meta, rope = inputs(3)
    _, g = _loss_and_grads(model_cfg(remat_policy=policy), x, meta, rope)
    ref = jax.tree.leaves(no_remat_grads)
    scale = max(float(np.abs(np.asarray(a)).max()) for a in ref)
    for a, b in zip(ref, jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=2e-6 * scale)


def test_remat_policies_recompute_in_search_order():
    """The traced FLOPs (recompute included) never decrease along remat.SEARCH_ORDER and end at the most for
    ``full``; the offload policies sit where their saved tensors put them."""
    from sgt_jax.compile import traced_flops
    from sgt_jax.models import remat

    x, meta, rope = inputs(3)
    flops = {}
    for policy in remat.SEARCH_ORDER + ("qkv_out_offload_mlp", "offload_qkv_out"):
        graphdef, state = nnx.split(build(model_cfg(remat_policy=policy)))
        grad = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x, meta, rope, num_und=U)[0] ** 2))
        flops[policy] = traced_flops(grad, state)
    order = [flops[p] for p in remat.SEARCH_ORDER]
    assert flops["dots"] < flops["qkv_out"] < flops["full"], flops
    assert flops["qkv_out_offload_mlp"] < flops["qkv_out"] == flops["offload_qkv_out"], flops
    assert order[-1] == max(order), flops
