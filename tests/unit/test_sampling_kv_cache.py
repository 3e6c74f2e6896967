"""KV-cache decoding == full recomputation, logits of every step (tiny random BAGEL, fp32).

The reference runs the whole sequence (ViT image block, text prompt, every decoded token so far) as one
packed pass with no cache, through the model's training-style call; the cached path prefills blocks and
decodes one token at a time with the jitted static-capacity step. Tolerance: fp32, atol 2e-5 on logits
(also holds on an H200 with full-precision matmuls; with the GPU default TF32 the gap is ~1e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.models.attention import CAUSAL, FULL, NOISE, TokenMeta
from sgt_jax.sampling import blocks, engine


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """Full-precision fp32 matmuls (GPUs default to TF32, ~1e-4 off; a no-op on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def tiny():
    from sgt_jax.configs_util import load_config
    from sgt_jax.sampling.loading import model_from_params, random_params

    cfg = load_config("configs/sgt_tiny.py")
    model = model_from_params(cfg, random_params(cfg, seed=3))  # every weight random (llm2vae too)
    return cfg, model, engine.Engine(model)


def _full_logits(model, vit_blk, text_ids):
    """Logits at every text position of ONE uncached pass over [ViT block, text ids] ([len(text_ids), V])."""
    n_vit = vit_blk["tokens"].shape[1]
    tokens = np.concatenate([vit_blk["tokens"][0], np.asarray(text_ids, np.int32)])
    kind = np.concatenate([vit_blk["kind"][0], np.ones(len(text_ids), np.int32)])
    t = len(tokens)
    batch = dict(tokens=tokens[None], kind=kind[None], vit_patches=vit_blk["vit_patches"],
                 vit_pos=vit_blk["vit_pos"], vit_image=vit_blk["vit_image"],
                 vit_row=np.concatenate([vit_blk["vit_row"][0], np.zeros(len(text_ids), np.int32)])[None])
    split = np.concatenate([np.zeros(n_vit), np.arange(1, len(text_ids) + 1)]).astype(np.int32)
    mode = np.concatenate([np.full(n_vit, FULL), np.full(len(text_ids), CAUSAL)]).astype(np.int32)
    rope = np.concatenate([np.zeros(n_vit), np.arange(1, len(text_ids) + 1)]).astype(np.int32)
    meta = TokenMeta(*(jnp.asarray(a[None]) for a in (np.zeros(t, np.int32), split, mode, np.arange(t, dtype=np.int32))))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    x, u = model.embed_batch(batch, jnp.zeros((1, 0, model.patch_latent_dim)), jnp.zeros((1, 0)))
    h, _, _ = model.llm(x, meta, jnp.asarray(rope[None]), num_und=u)
    return np.asarray(model.llm.logits(h[0, n_vit:]))


def test_cached_decoding_matches_full_recompute(tiny):
    cfg, model, eng = tiny
    tok = cfg.model.tokens
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (28, 42, 3)).astype(np.float32)
    vb = blocks.vit_block(img, tok, 14, cfg.model.vit.max_patches_per_side)
    prompt = [7, 8, 9, 10, 11]
    ctx = engine.empty_context(model, 64)
    ctx = eng.append(ctx, vb, rope_advance=vb["rope_advance"])
    tb = blocks.text_block(prompt, tok, pad_to=16)
    assert tb["tokens"].shape[1] == 16  # padded: the pad tokens must be invisible
    ctx = eng.append(ctx, tb, rope_advance=tb["rope_advance"])
    assert (ctx.length, ctx.rope) == (vb["n_real"] + 7, 1 + 7)

    seq = [tok.bos] + prompt + [tok.eos]
    token, steps = tok.bos, []
    for _ in range(4):
        seq.append(int(token))
        logits, token, ctx = eng.decode_step(ctx, token, jax.random.key(0), greedy=True, temperature=1.0,
                                             top_p=1.0)
        steps.append((np.asarray(logits), int(token)))
    # causal text: one uncached pass over the final sequence gives every step's logits at once
    full = _full_logits(model, vb, seq)
    for i, (logits, token) in enumerate(steps):
        want = full[len(prompt) + 2 + i]
        np.testing.assert_allclose(logits, want, atol=2e-5, rtol=1e-5)
        assert token == int(np.argmax(want))
    assert np.std(full) > 1e-3  # logits are not trivially constant


def test_velocity_batch_of_contexts_matches_single(tiny):
    """Stacked CFG contexts give the same velocities as one-at-a-time calls (and differ from each other)."""
    cfg, model, eng = tiny
    tok = cfg.model.tokens
    empty = engine.empty_context(model, 64)
    gen = eng.append(empty, blocks.text_block([20, 21, 22], tok), rope_advance=5)
    other = eng.append(empty, blocks.text_block([30], tok), rope_advance=3)
    q = blocks.latent_query_block(2, 3, cfg.model.max_latent_size, tok)
    x = np.random.default_rng(1).normal(size=(6, model.patch_latent_dim)).astype(np.float32)
    v3 = np.asarray(eng.velocity([gen, empty, other], q, x, 0.7))
    for i, c in enumerate([gen, empty, other]):
        np.testing.assert_allclose(v3[i], np.asarray(eng.velocity([c], q, x, 0.7))[0], atol=1e-5)
    assert not np.allclose(v3[0], v3[1], atol=1e-4)
    assert q["mode"][0, 0] == NOISE


def test_sample_logits_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    one = lambda k, p: engine.sample_logits(logits, k, greedy=False, temperature=1.0, top_p=p)[0]
    many = jax.jit(jax.vmap(one, in_axes=(0, None)))  # one compile: top_p is traced
    draw = lambda p: np.asarray(many(keys, jnp.float32(p)))
    assert set(draw(0.4)) == {0}  # the top token alone reaches 0.4
    assert set(draw(0.7)) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(draw(0.9)) == {0, 1, 2}
    assert set(draw(1.0)) >= {0, 1, 2}
    assert int(engine.sample_logits(logits, keys[0], greedy=True, temperature=1.0, top_p=0.1)[0]) == 0


def test_cache_overflow_is_an_error(tiny):
    cfg, model, eng = tiny
    ctx = engine.empty_context(model, 16)
    with pytest.raises(ValueError, match="KV cache full"):
        eng.append(ctx, blocks.text_block(list(range(10, 30)), cfg.model.tokens), rope_advance=22)


def test_velocity_against_cache_matches_full_pass(tiny):
    """The latent query block against a cached prompt == one uncached pass over [prompt, query block]."""
    cfg, model, eng = tiny
    tok = cfg.model.tokens
    ids = [20, 21, 22, 23]
    tb = blocks.text_block(ids, tok, pad_to=16)
    ctx = eng.append(engine.empty_context(model, 64), tb, rope_advance=tb["rope_advance"])
    h, w = 2, 3
    q = blocks.latent_query_block(h, w, cfg.model.max_latent_size, tok)
    x = np.random.default_rng(2).normal(size=(h * w, model.patch_latent_dim)).astype(np.float32)
    got = np.asarray(eng.velocity([ctx], q, x, 0.6))[0]

    text = [tok.bos] + ids + [tok.eos]
    n, z = len(text), h * w
    tokens = np.asarray(text + [tok.vision_start, tok.vision_end] + [0] * z, np.int32)
    kind = np.asarray([1] * (n + 2) + [3] * z, np.int32)
    split = np.asarray([0] * n + [1] * (z + 2), np.int32)
    mode = np.asarray([CAUSAL] * n + [NOISE] * (z + 2), np.int32)
    order = np.concatenate([np.arange(n), [n, n + z + 1], n + 1 + np.arange(z)]).astype(np.int32)
    rope = np.asarray(list(range(n)) + [n] * (z + 2), np.int32)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    batch = dict(tokens=tokens[None], kind=kind[None],
                 latent_pos=(rows * cfg.model.max_latent_size + cols).reshape(1, -1).astype(np.int32))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    emb, u = model.embed_batch(batch, jnp.asarray(x)[None], jnp.full((1, z), 0.6, jnp.float32))
    meta = TokenMeta(*(jnp.asarray(a[None]) for a in (np.zeros(n + 2 + z, np.int32), split, mode, order)))
    hid, _, _ = model.llm(emb, meta, jnp.asarray(rope[None]), num_und=u)
    want = np.asarray(model.llm2vae(hid[:, u:]))[0]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.abs(want).max() > 1e-3
