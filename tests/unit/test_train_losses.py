"""Loss normalisation, flow-matching inputs, chunked CE, EMA arithmetic, schedules, freeze groups.

These tests use a small stand-in model with the Bagel API (forward, lm_logits) so they compile in
seconds; the real Bagel runs in tests/unit/test_train_step.py.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sgt_jax.train import freeze, losses, optim
from tests.sharding.fake_batches import make_batch, small_config


class _StandIn(nnx.Module):
    """forward: ce_hidden = tanh(embedding of the label position's token); velocity = x_t @ w."""

    def __init__(self, vocab, hidden, latent_dim, rngs):
        self.emb = nnx.Param(jax.random.normal(rngs.params(), (vocab, hidden)))
        self.head = nnx.Param(jax.random.normal(rngs.params(), (hidden, vocab)))
        self.w = nnx.Param(jax.random.normal(rngs.params(), (latent_dim, latent_dim)) * 0.3)
        self.vae = None

    def forward(self, batch, x_t, t):
        tok = jnp.take_along_axis(batch["tokens"], batch["ce_pos"], axis=1)
        return jnp.tanh(self.emb[...][tok]), x_t @ self.w[...] + t[..., None]

    def lm_logits(self, h):
        return h @ self.head[...]


def _np_reference(model, batch, x_t, t, v_target):
    h, vel = (np.asarray(a, np.float64) for a in model.forward(batch, x_t, t))
    logits = h @ np.asarray(model.head[...], np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, batch["ce_label"][..., None], -1)[..., 0]
    valid = batch["ce_valid"]
    ce = ((lse - picked) * valid).sum() / valid.sum()
    target = batch["latent_target"] & (batch["latent_image"] >= 0)
    per_tok = ((vel - np.asarray(v_target, np.float64)) ** 2).mean(-1)
    mse = (per_tok * target).sum() / target.sum()
    return ce, mse


@pytest.fixture(scope="module")
def setup():
    cfg = small_config(packs=4, latents="cached")
    batch = {k: jnp.asarray(v) for k, v in make_batch(cfg, seed=3).items()}
    d = cfg.model.latent_patch_size ** 2 * cfg.model.vae.z_channels
    model = _StandIn(cfg.model.llm.vocab_size, 8, d, nnx.Rngs(0))
    return cfg, batch, model


def test_loss_is_global_token_mean(setup):
    cfg, batch, model = setup
    key = jax.random.PRNGKey(7)
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, b, k: losses.sgt_loss(nnx.merge(graphdef, p), b, k, cfg.train, cfg.model, num_images=1))
    loss, aux = fn(params, batch, key)
    x_t, t, v = losses.flow_inputs(batch, key, vae=None, model_cfg=cfg.model, shift=1.0, num_images=1)
    ce, mse = _np_reference(model, {k: np.asarray(a) for k, a in batch.items()}, x_t, t, v)
    # packs have different numbers of valid labels / targets: a per-pack mean would differ from this.
    assert int(aux["n_ce"]) == 4 * 8 - 2 * 2 and int(aux["n_mse"]) == 4 * 16 - 2 * 4
    np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(aux["mse"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 1.5 * ce + 1.0 * mse, rtol=1e-5)


def test_flow_inputs_formulas(setup):
    cfg, batch, _ = setup
    key = jax.random.PRNGKey(11)
    x_t, t, v = (np.asarray(a) for a in
                 losses.flow_inputs(batch, key, vae=None, model_cfg=cfg.model, shift=3.0, num_images=1))
    k_post, k_t, k_eps = jax.random.split(key, 3)
    mean, logvar = np.asarray(batch["latent_mean"]), np.asarray(batch["latent_logvar"])
    z = mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(k_post, mean.shape))
    x0 = cfg.model.vae.scale_factor * (z - cfg.model.vae.shift_factor)
    real = np.asarray(batch["latent_image"]) >= 0
    x0 = np.where(real[..., None], x0, 0)
    s = 1 / (1 + np.exp(-np.asarray(jax.random.normal(k_t, (4, 1)))))
    s = 3 * s / (1 + 2 * s)  # shift 3
    expect_t = np.where(np.asarray(batch["latent_target"]) & real, s[:, :1], 0)
    np.testing.assert_allclose(t, expect_t, rtol=1e-6)
    eps = np.asarray(jax.random.normal(k_eps, x0.shape))
    np.testing.assert_allclose(v, eps - x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_t, (1 - t[..., None]) * x0 + t[..., None] * eps, rtol=1e-5, atol=1e-6)
    assert np.all(x_t[~real] == 0)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_ce_matches_full(setup, chunk):
    cfg, batch, model = setup
    h = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8))
    full_logits = model.lm_logits(h)
    ref = jnp.sum(jnp.where(batch["ce_valid"], jax.nn.logsumexp(full_logits, -1) - jnp.take_along_axis(
        full_logits, batch["ce_label"][..., None], -1)[..., 0], 0))
    total, n = losses.chunked_ce_sum(model, h, batch["ce_label"], batch["ce_valid"], chunk)
    np.testing.assert_allclose(float(total), float(ref), rtol=1e-5)
    assert int(n) == int(batch["ce_valid"].sum())
    g1 = jax.grad(lambda h: losses.chunked_ce_sum(model, h, batch["ce_label"], batch["ce_valid"], chunk)[0])(h)
    g2 = jax.grad(lambda h: losses.chunked_ce_sum(model, h, batch["ce_label"], batch["ce_valid"], 8)[0])(h)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-6)


def test_ema_arithmetic():
    rng = np.random.default_rng(0)
    e, p = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    out = optim.ema_update({"a": jnp.asarray(e)}, {"a": jnp.asarray(p)}, 0.9999)["a"]
    np.testing.assert_allclose(np.asarray(out), 0.9999 * e + (1 - 0.9999) * p, rtol=1e-6, atol=1e-7)
    e16 = jnp.asarray(e, jnp.bfloat16)
    out16 = optim.ema_update({"a": e16}, {"a": jnp.asarray(p)}, 0.5)["a"]
    assert out16.dtype == jnp.bfloat16
    expect = (0.5 * np.asarray(e16, np.float32) + 0.5 * p).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out16), np.asarray(expect))


def test_schedules():
    c = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=4, schedule="constant", min_lr=1e-7))
    s = optim.learning_rate_schedule(c, 100)
    np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 4, 50)], [0, 2.5e-5, 5e-5, 1e-4, 1e-4], rtol=1e-6)
    c.schedule = "cosine"
    s = optim.learning_rate_schedule(c, 100)
    np.testing.assert_allclose(float(s(100)), 1e-7, rtol=1e-4)
    np.testing.assert_allclose(float(s(4)), 1e-4, rtol=1e-6)
    c.schedule = "linear"
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optim.learning_rate_schedule(c, 100)


def test_freeze_groups_cover_bagel(tiny_config):
    from sgt_jax.models.bagel import abstract_params
    from sgt_jax.models.groups import BAGEL_GROUPS

    with nnx.use_eager_sharding(False):
        tree = abstract_params(tiny_config.model)
    groups = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
        g = freeze.group_of([getattr(k, "key", k) for k in path])
        groups[g] = groups.get(g, 0) + 1
    assert set(groups) == set(BAGEL_GROUPS)
    assert freeze.frozen_groups(tiny_config) == {"vae"}
    tiny_config.train.freeze.vit = True
    assert freeze.frozen_groups(tiny_config) == {"vae", "vit"}
    with pytest.raises(ValueError, match="no freeze group"):
        freeze.group_of(("mystery", "kernel"))
