"""The numpy Qwen2.5-VL data rules vs transformers: image preprocessing (``Qwen2VLImageProcessorPil``),
the M-RoPE positions (``Qwen2_5_VLModel.get_rope_index``) and the vision window layout
(``get_vision_window_index`` / ``get_vision_position_ids``). No model weights involved: fast."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
transformers = pytest.importorskip("transformers", reason="needs the [torch] extra")

from PIL import Image  # noqa: E402
from transformers import vision_utils  # noqa: E402

from sgt_jax.data import qwen_vl_image as qimg  # noqa: E402
from sgt_jax.data import qwen_vl_plan as plan  # noqa: E402

IMAGE, START, END = 151655, 151652, 151653


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("min_pixels,max_pixels", [(qimg.SGT_MIN_PIXELS, qimg.SGT_MAX_PIXELS),
                                                   (56 * 56, 28 * 28 * 40)])
def test_preprocessing_matches_the_processor(min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    images = [_image(97, 211, 0), _image(300, 140, 1), _image(30, 30, 2)]  # up- and downscaled, odd sizes
    ref = proc(images=images, return_tensors="np")
    pv, grid = qimg.preprocess_images(images, min_pixels=min_pixels, max_pixels=max_pixels)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert pv.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-5, rtol=0)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    for h, w in rng.integers(10, 3000, (200, 2)):
        assert qimg.smart_resize(int(h), int(w), 28, qimg.SGT_MIN_PIXELS, qimg.SGT_MAX_PIXELS) == \
            smart_resize(int(h), int(w), 28, qimg.SGT_MIN_PIXELS, qimg.SGT_MAX_PIXELS)


def _hf_model():
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=16))
    return transformers.Qwen2_5_VLModel.get_rope_index, cfg


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 8, 4), (1, 2, 2), (1, 6, 10)]])
def test_mrope_positions_match_get_rope_index(grids):
    get_rope_index, cfg = _hf_model()
    rng = np.random.default_rng(len(grids))
    rows = []
    for b in range(2):  # two rows, right-padded, the images split between them
        ids = list(rng.integers(0, 1000, 3 + b))
        for t, h, w in grids[b::2]:
            ids += [START] + [IMAGE] * (t * h * w // 4) + [END] + list(rng.integers(0, 1000, 2))
        rows.append(ids)
    n = max(map(len, rows)) + 2
    ids = np.zeros((2, n), np.int64)
    valid = np.zeros((2, n), bool)
    for b, r in enumerate(rows):
        ids[b, :len(r)], valid[b, :len(r)] = r, True
    order = [g for b in range(2) for g in grids[b::2]]

    class Holder:  # get_rope_index needs only these two attributes of the model
        config = cfg
        get_vision_position_ids = transformers.Qwen2_5_VLModel.get_vision_position_ids

    ref, ref_delta = get_rope_index(Holder(), torch.from_numpy(ids),
                                    mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64)),
                                    image_grid_thw=torch.tensor(order), attention_mask=torch.from_numpy(valid))
    pos, delta = plan.mrope_positions(ids, order, image_token_id=IMAGE, spatial_merge_size=2, valid=valid)
    np.testing.assert_array_equal(pos[:, valid], ref.numpy()[:, valid])
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


@pytest.mark.parametrize("window", [56, 112])
def test_vision_pack_matches_the_window_index(window):
    grids = [(1, 8, 12), (1, 6, 10), (1, 4, 4), (1, 16, 2)]
    pack = plan.vision_pack(grids, patch_size=14, spatial_merge_size=2, window_size=window, max_patches=512)
    gt = torch.tensor(grids)
    win_idx, cu = vision_utils.get_vision_window_index(gt, spatial_merge_size=2, window_size=window, patch_size=14)
    n = int(np.prod(grids, axis=1).sum())
    want_source = (win_idx.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    np.testing.assert_array_equal(pack["source"][:n], want_source)
    assert (pack["source"][n:] == -1).all() and (pack["window_id"][n:] == -1).all()
    # windows: contiguous runs whose boundaries are transformers' cu_window_seqlens
    bounds = np.flatnonzero(np.diff(pack["window_id"][:n])) + 1
    np.testing.assert_array_equal(np.concatenate([[0], bounds, [n]]), cu.numpy())
    cu_full, _ = vision_utils.get_vision_attention_seqlens(gt, transformers.Qwen2_5_VLVisionConfig())
    img_bounds = np.flatnonzero(np.diff(pack["image_id"][:n])) + 1
    np.testing.assert_array_equal(np.concatenate([[0], img_bounds, [n]]), cu_full.numpy())
    pos = vision_utils.get_vision_position_ids(gt, 2).numpy()
    np.testing.assert_array_equal(pack["pos_hw"][:n], pos[want_source])
    np.testing.assert_array_equal(pack["merged_index"], np.argsort(win_idx.numpy()))
