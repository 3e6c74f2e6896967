"""Qwen2.5-VL text decoding with the preallocated KV cache (sgt_jax/sampling/qwen_decode.py), tiny random
model, fp32: greedy decoding == argmax of full uncached forwards over prompt + generated tokens (a prompt
with an image, padded to its bucket); stop ids end the answer; the DiT-condition hidden states == the
plain forward's. The comparison with transformers' ``generate`` is tests/parity/test_qwen_generate_vs_hf.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.data import qwen_vl_plan as plan
from sgt_jax.models import qwen2_5_vl as qvl
from sgt_jax.sampling import qwen_decode

PIX = dict(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def tiny():
    """Random weights filled with numpy into the abstract model (no eager init: seconds, not a minute)."""
    cfg = qvl.config("tiny")
    graphdef, state, rest = nnx.split(nnx.eval_shape(lambda: qvl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    rng = np.random.default_rng(3)
    fill = lambda path, a: jnp.asarray((1.0 if str(path[-1].key) == "scale" else 0.0)  # noqa: E731
                                       + rng.standard_normal(a.shape) * 0.1, a.dtype)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, state.to_pure_dict()))
    model = nnx.merge(graphdef, state, rest)
    return cfg, model, qwen_decode.QwenEngine(model, cfg)


def _prompt(cfg):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    ids = [7, 8, cfg.tokens.vision_start, cfg.tokens.image, cfg.tokens.vision_end, 9, 10, 11]
    return qwen_decode.prompt_inputs(cfg, ids, [image], **PIX, token_bucket=32, patch_bucket=64)


def _full_forward_logits(model, cfg, p, extra):
    """Logits at the positions that predict each token after the prompt, from ONE uncached forward over
    prompt + ``extra`` (the model is causal: position n - 1 + i sees exactly prompt + extra[:i])."""
    n = p.length
    ids = np.concatenate([p.ids[:, :n], np.asarray(extra, np.int32).reshape(1, -1)], axis=1)
    pos, _ = plan.mrope_positions(ids, p.grids, image_token_id=cfg.tokens.image, spatial_merge_size=2)
    index = np.concatenate([p.vision_index[:, :n], np.full((1, len(extra)), -1, np.int32)], axis=1)
    logits, _ = model(jnp.asarray(ids), jnp.asarray(pos), vision=qvl.VisionInputs(*map(jnp.asarray, p.vision)),
                      vision_index=jnp.asarray(index))
    return np.asarray(logits)[0, n - 1:]


def test_greedy_cache_decode_equals_argmax_of_full_forwards(tiny):
    cfg, model, engine = tiny
    p = _prompt(cfg)
    assert p.ids.shape[1] == 32 and p.length < 32  # padded prompt
    assert int((p.ids == cfg.tokens.image).sum()) == int(np.prod(p.grids[0])) // 4  # placeholder expanded
    out = engine.generate(p, max_new_tokens=6, greedy=True, cache_bucket=16)
    assert len(out) == 6
    ref = _full_forward_logits(model, cfg, p, out[:-1])  # [6, V]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 1e-4).all(), "argmax ill-defined: pick another seed"
    assert out == [int(i) for i in np.argmax(ref, axis=-1)]
    # a stop id ends the answer before it
    stopped = engine.generate(p, max_new_tokens=6, greedy=True, stop_ids=[out[3]], cache_bucket=16)
    assert stopped == out[: out.index(out[3])]


def test_hidden_states_equal_the_plain_forward(tiny):
    cfg, model, engine = tiny
    p = _prompt(cfg)
    h, mask = engine.hidden(p)
    assert np.asarray(mask).sum() == p.length
    n = p.length
    _, ref = model(jnp.asarray(p.ids[:, :n]), jnp.asarray(p.positions[:, :, :n]),
                   vision=qvl.VisionInputs(*map(jnp.asarray, p.vision)), vision_index=jnp.asarray(p.vision_index[:, :n]))
    np.testing.assert_allclose(np.asarray(h)[:, :n], np.asarray(ref), atol=2e-5, rtol=0)


def test_placeholder_count_is_checked(tiny):
    cfg, _, _ = tiny
    with pytest.raises(ValueError, match="1 image placeholders for 2 images"):
        qwen_decode.prompt_inputs(cfg, [1, cfg.tokens.image], [np.zeros((56, 56, 3), np.uint8)] * 2, **PIX)
