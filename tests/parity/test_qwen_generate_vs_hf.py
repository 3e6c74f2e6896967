"""Greedy decoding of Qwen2.5-VL with our preallocated KV cache (sgt_jax/sampling/qwen_decode.py) == transformers'
``generate`` (greedy, its own cache and ``rope_deltas``) on a tiny random fp32 model with the same weights
(the conversion table), for a prompt with one image: the same 8 new tokens.
A wrong decode position (no M-RoPE delta) changes the image prompt's tokens."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
pytest.importorskip("transformers", reason="needs the [torch] extra")

from sgt_jax.data import qwen_vl_image  # noqa: E402
from sgt_jax.sampling import qwen_decode  # noqa: E402
from tests.parity.test_qwen2_5_vl_vs_hf import build  # noqa: E402

PIX = dict(min_pixels=56 * 56, max_pixels=112 * 112)
NEW = 8


@pytest.fixture(scope="module")
def models():
    cfg, hf, model = build(tied=True)
    return cfg, hf, qwen_decode.QwenEngine(model, cfg)


def hf_generate(hf, cfg, p, images):
    ids = torch.from_numpy(p.ids[:, : p.length].astype(np.int64))
    pixel_values, grid = qwen_vl_image.preprocess_images(images, **PIX)
    kw = dict(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid),
              mm_token_type_ids=(ids == cfg.tokens.image).long())
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, p.length:].tolist()


def test_greedy_generate_matches_transformers(models):
    cfg, hf, engine = models
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)]
    ids = [11, 12, 13, cfg.tokens.vision_start, cfg.tokens.image, cfg.tokens.vision_end] + list(rng.integers(20, 400, 5))
    p = qwen_decode.prompt_inputs(cfg, ids, images, **PIX, token_bucket=32, patch_bucket=64)
    want = hf_generate(hf, cfg, p, images)
    got = engine.generate(p, max_new_tokens=NEW, greedy=True, cache_bucket=16)
    assert got == want
    assert p.delta != 0  # the image shifts the decode positions
    wrong = engine.generate(p._replace(delta=0), max_new_tokens=NEW, greedy=True, cache_bucket=16)
    assert wrong != want
