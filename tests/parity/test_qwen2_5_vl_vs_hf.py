"""Qwen2.5-VL (OmniGen2's MLLM) vs transformers ``Qwen2_5_VLForConditionalGeneration``.

Tiny random fp32 config (2 decoder layers, hidden 64, GQA 4/2, M-RoPE sections [2, 3, 3]; vision depth 4
with one full-attention block, windows of 2x2 merged tokens so every image has several windows, some
partial). Every weight (norms included) is randomised in PyTorch and reaches our model only through the
conversion table (sgt_jax/checkpoint/qwen2_5_vl_table.py). Our side gets the M-RoPE positions, the vision
pack layout and the vision token index from the numpy rules of sgt_jax/data/qwen_vl_plan.py; PyTorch
computes its own. Compared: logits and last hidden states (after the final norm), atol 2e-5.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
transformers = pytest.importorskip("transformers", reason="needs the [torch] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.checkpoint import qwen2_5_vl_table as table  # noqa: E402
from sgt_jax.data import qwen_vl_plan as plan  # noqa: E402
from sgt_jax.models import qwen2_5_vl as qvl  # noqa: E402
from tests.fixtures.qwen2_5_vl_folder import hf_config  # noqa: E402

ATOL = 2e-5


def build(tied: bool, impl: str = "dense", chunk: int = 512):
    cfg = qvl.config("tiny")
    cfg.text.tie_word_embeddings = tied
    cfg.attention_impl, cfg.attention_chunk = impl, chunk
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.1 * torch.randn_like(p))
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    params = table.state_dict_to_params(sd, cfg)
    model = qvl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return cfg, hf, model


def prompt(cfg, grids, rng, n_text=(5, 4, 3)):
    """Text, then per image <vision_start> image-pad tokens <vision_end> and more text."""
    merge = cfg.vision.spatial_merge_size
    ids = list(rng.integers(0, 400, n_text[0]))
    for i, (t, h, w) in enumerate(grids):
        ids += [cfg.tokens.vision_start] + [cfg.tokens.image] * (t * h * w // merge ** 2) + [cfg.tokens.vision_end]
        ids += list(rng.integers(0, 400, n_text[1 + i % 2]))
    return np.asarray([ids], np.int64)


def run_both(cfg, hf, model, ids, grids=(), *, max_patches=None):
    rng = np.random.default_rng(1)
    v = cfg.vision
    kw, vision, vindex, extra = {}, None, None, {}
    if grids:
        grid_thw = np.asarray(grids, np.int64)
        dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        pixel_values = rng.normal(size=(int(np.prod(grid_thw, 1).sum()), dim)).astype(np.float32)
        kw = dict(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid_thw),
                  mm_token_type_ids=torch.from_numpy((ids == cfg.tokens.image).astype(np.int64)))
        pack = plan.vision_pack(grid_thw, patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                                window_size=v.window_size, max_patches=max_patches)
        patches = plan.gather_patches(pixel_values, pack["source"])
        vision = qvl.VisionInputs(*(jnp.asarray(a)[None] for a in (patches, pack["image_id"], pack["window_id"],
                                                                     pack["pos_hw"])))
        vindex = jnp.asarray(plan.vision_token_index(ids, pack["merged_index"], image_token_id=cfg.tokens.image))
        extra = dict(vision=vision, pack=pack, pixel_values=pixel_values)
    positions, _ = plan.mrope_positions(ids, np.asarray(grids).reshape(-1, 3), image_token_id=cfg.tokens.image,
                                        spatial_merge_size=v.spatial_merge_size)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), output_hidden_states=True, **kw)
    logits, hidden = model(jnp.asarray(ids, jnp.int32), jnp.asarray(positions), vision=vision, vision_index=vindex)
    return (out.logits.numpy(), out.hidden_states[-1].numpy()), (np.asarray(logits), np.asarray(hidden)), extra


def check(ref, ours):
    for name, a, b in zip(("logits", "last hidden"), ref, ours):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=0, err_msg=name)


def test_text_only_untied_head():
    cfg, hf, model = build(tied=False)
    ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (1, 21))
    ref, ours, _ = run_both(cfg, hf, model, ids)
    check(ref, ours)


def test_one_image_tied_head():
    cfg, hf, model = build(tied=True)
    grids = [(1, 8, 12)]  # 4x6 merged tokens -> 2x3 windows of 2x2
    ids = prompt(cfg, grids, np.random.default_rng(0))
    ref, ours, extra = run_both(cfg, hf, model, ids, grids)
    check(ref, ours)
    # the vision tower alone, in the LLM's token order (ours: window order, put back by merged_index)
    with torch.no_grad():
        hf_merged = hf.model.visual(torch.from_numpy(extra["pixel_values"]),
                                    grid_thw=torch.tensor(grids)).pooler_output.numpy()
    merged = np.asarray(model.visual(*extra["vision"]))[0][extra["pack"]["merged_index"]]
    np.testing.assert_allclose(merged, hf_merged, atol=ATOL, rtol=0)


def test_two_images_of_different_sizes_chunked_padded():
    """Two images (one with partial windows), chunked attention with small blocks, a padded vision pack."""
    cfg, hf, model = build(tied=True, impl="chunked", chunk=16)
    grids = [(1, 6, 10), (1, 4, 4)]  # 3x5 merged -> 2x3 windows (partial), 2x2 merged -> 1 window
    ids = prompt(cfg, grids, np.random.default_rng(2))
    ref, ours, _ = run_both(cfg, hf, model, ids, grids, max_patches=96)
    check(ref, ours)
