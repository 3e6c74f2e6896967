"""Greedy decoding of Qwen2.5-VL with our preallocated KV cache (sgt_jax/sampling/qwen_decode.py) == transformers'
``generate`` (greedy, its own cache and ``rope_deltas``) on a tiny random fp32 model with the same weights
(the conversion table), for a prompt with one image: the same 8 new tokens.
A wrong decode position (no M-RoPE delta) changes the image prompt's tokens."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
transformers = pytest.importorskip("transformers", reason="needs the [torch] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.checkpoint import qwen2_5_vl_table as table  # noqa: E402
from sgt_jax.data import qwen_vl_image  # noqa: E402
from sgt_jax.models import qwen2_5_vl as qvl  # noqa: E402
from sgt_jax.sampling import qwen_decode  # noqa: E402
from tests.fixtures.qwen2_5_vl_folder import hf_config  # noqa: E402

PIX = dict(min_pixels=56 * 56, max_pixels=112 * 112)
NEW = 8


@pytest.fixture(scope="module")
def models():
    """test_qwen2_5_vl_vs_hf's tiny random model, its weights put into an abstract model (no eager init)."""
    cfg = qvl.config("tiny")
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.1 * torch.randn_like(p))
    params = table.state_dict_to_params({k: v.detach().numpy() for k, v in hf.state_dict().items()}, cfg)
    graphdef, state, rest = nnx.split(nnx.eval_shape(lambda: qvl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return cfg, hf, qwen_decode.QwenEngine(nnx.merge(graphdef, state, rest), cfg)


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
