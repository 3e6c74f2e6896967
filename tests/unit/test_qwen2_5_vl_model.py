"""Qwen2.5-VL model properties that need no PyTorch (tiny config, CPU): logical axis names on every
parameter, padding / packing invariance, chunked == dense attention, unscanned == scanned, bf16 runs,
KV-cache decode == full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.data import qwen_vl_plan as plan
from sgt_jax.models import qwen2_5_vl as qvl
from sgt_jax.parallel.sharding import variable_logical_names


@pytest.fixture(scope="module")
def tiny():
    cfg = qvl.config("tiny")
    return cfg, qvl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference(tiny):
    """One prompt with two images and the fp32 dense forward of it (each forward costs seconds of compile)."""
    cfg, model = tiny
    inputs = _inputs(cfg, np.random.default_rng(0))
    ids, pos, vision, index = inputs
    logits, h = model(ids, pos, vision=vision, vision_index=index)
    return inputs, logits, h


def _inputs(cfg, rng):
    v = cfg.vision
    grids = [(1, 4, 8), (1, 6, 4)]
    ids = [1, 2, 3, cfg.tokens.vision_start] + [cfg.tokens.image] * 8 + [cfg.tokens.vision_end, 4, 5,
                                                                      cfg.tokens.vision_start] + \
        [cfg.tokens.image] * 6 + [cfg.tokens.vision_end, 6]
    ids = np.asarray([ids])
    pack = plan.vision_pack(grids, patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                            window_size=v.window_size, max_patches=64)
    dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    pv = rng.normal(size=(int(np.prod(grids, 1).sum()), dim)).astype(np.float32)
    vision = qvl.VisionInputs(*(jnp.asarray(a)[None] for a in (plan.gather_patches(pv, pack["source"]),
                                                               pack["image_id"], pack["window_id"], pack["pos_hw"])))
    pos, _ = plan.mrope_positions(ids, grids, image_token_id=cfg.tokens.image, spatial_merge_size=2)
    index = plan.vision_token_index(ids, pack["merged_index"], image_token_id=cfg.tokens.image)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(pos), vision, jnp.asarray(index)


def test_every_parameter_has_logical_names(tiny):
    _, model = tiny
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for var in leaves:
        names = variable_logical_names(var)
        assert names is not None and len(names) == var[...].ndim, (names, var[...].shape)


def test_padding_and_a_second_document_do_not_change_the_first(tiny, reference):
    cfg, model = tiny
    (ids, pos, vision, index), _, h = reference
    t = ids.shape[1]
    # the same prompt, then a second (text) document and padding in the same row
    extra = 7
    ids2 = jnp.concatenate([ids, jnp.full((1, extra), 9, jnp.int32)], axis=1)
    pos2 = jnp.concatenate([pos, jnp.broadcast_to(jnp.arange(extra, dtype=jnp.int32), (3, 1, extra))], axis=2)
    doc = jnp.asarray([[0] * t + [1] * 4 + [-1] * 3], jnp.int32)
    index2 = jnp.concatenate([index, jnp.full((1, extra), -1, jnp.int32)], axis=1)
    _, h2 = model(ids2, pos2, doc, vision=vision, vision_index=index2)
    np.testing.assert_allclose(np.asarray(h2[:, :t]), np.asarray(h), atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(h2)).all()


def test_chunked_unscanned_and_bf16_match_dense(tiny, reference):
    cfg, model = tiny
    (ids, pos, vision, index), ref_logits, ref_h = reference
    params = nnx.state(model, nnx.Param)
    for change, atol in ((dict(attention_impl="chunked", attention_chunk=8), 2e-5),
                         (dict(scan_layers=False, remat_policy="full"), 2e-5),
                         (dict(dtype="bfloat16"), None)):
        c = qvl.config("tiny")
        c.update(change)
        other = qvl.Qwen2_5_VL(c, rngs=nnx.Rngs(5))
        nnx.update(other, params)
        logits, h = other(ids, pos, vision=vision, vision_index=index)
        assert logits.dtype == jnp.float32
        if atol is not None:
            np.testing.assert_allclose(np.asarray(h), np.asarray(ref_h), atol=atol, rtol=0, err_msg=str(change))
            np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=atol, rtol=0)
            continue
        # bf16 compute, fp32 master weights: close, not equal
        assert h.dtype == jnp.bfloat16
        assert nnx.state(other, nnx.Param)["language_model"]["norm"]["scale"][...].dtype == jnp.float32
        err = np.abs(np.asarray(h, np.float32) - np.asarray(ref_h)).max() / np.abs(np.asarray(ref_h)).max()
        assert err < 0.05, err


def test_bad_config_and_inputs_are_named():
    c = qvl.config("tiny")
    c.vision.fullatt_block_indexes = (9,)
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        qvl.Qwen2_5_VL(c, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mrope_section"):
        qvl.mrope_cos_sin(jnp.zeros((3, 1, 2)), 16, 1e4, (2, 2, 2))
    with pytest.raises(ValueError, match="image tokens"):
        plan.vision_token_index(np.asarray([[1, 500]]), np.arange(3), image_token_id=500)
    with pytest.raises(ValueError, match="vision pack holds"):
        plan.vision_pack([(1, 4, 4)], patch_size=14, spatial_merge_size=2, window_size=56, max_patches=8)


def test_kv_cache_decode_matches_the_full_forward(tiny, reference):
    """Prefill a prompt with images, then feed the remaining tokens one at a time through the cache."""
    cfg, model = tiny
    (ids, pos, vision, index), ref_logits, _ = reference
    t = ids.shape[1]
    t0 = t - 2  # the last two tokens (<|vision_end|>, text) are decoded one by one
    order = jnp.arange(t, dtype=jnp.int32)[None]
    logits, _, kv = model.step(ids[:, :t0], pos[:, :, :t0], order[:, :t0], vision=vision, vision_index=index[:, :t0])
    outs = [logits]
    for i in range(t0, t):
        logits, _, new = model.step(ids[:, i:i + 1], pos[:, :, i:i + 1], order[:, i:i + 1], kv_cache=kv)
        kv = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=2 if a.ndim == 5 else 1), kv, new)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(ref_logits), atol=2e-5, rtol=0)
