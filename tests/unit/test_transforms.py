"""BAGEL's ImageTransform sizing (with SGT's max-pixels fix), resizing, normalisation and ViT patchify."""

import numpy as np
import pytest

from sgt_jax.data.transforms import ImageTransform, Transforms, latent_grid, normalize, patchify, resize, vae_stride

SGT_VIT = ImageTransform(224, 224, 14)
VAE = ImageTransform(1024, 512, 16)
VLM = ImageTransform(980, 378, 14, max_pixels=2_007_040)


@pytest.mark.parametrize("tr, size, expected", [
    # SA-1B 2250x1500: short side pushed to 224 (336x224), then the long side capped at 224 -> 224x154
    (SGT_VIT, (2250, 1500), (224, 154)),
    (SGT_VIT, (1000, 1000), (224, 224)),
    # upscaled by min: 373x224 -> 378x224; long side capped: 224 x round(132.7)=133 -> 133/14=9.5 -> 10 -> 140
    (SGT_VIT, (100, 60), (224, 140)),
    # VAE: 2250x1500 -> scale 1024/2250 -> 1024x682.7 -> 688 (song2yu/SGT `BAGEL/data/sam_190k.py`: 64x43 latent tokens)
    (VAE, (2250, 1500), (1024, 688)),
    (VAE, (640, 480), (688, 512)),  # min side 512 wins: 682.7 -> 688
    (VLM, (640, 480), (644, 476)),  # 640/14=45.7 -> 46*14; 480/14=34.3 -> 34*14
])
def test_output_size_hand_computed(tr, size, expected):
    assert tr.output_size(*size) == expected


def test_max_pixels_uses_sqrt_area_factor_on_original_size():
    # 4 images of 980x980 share 2,007,040 px -> 501,760 each. SGT rule: sqrt(501760/960400) = 0.7228 of the
    # ORIGINAL size -> 708.4 -> nearest multiple of 14 = 714. (The official rule multiplied the resized size by
    # the area ratio 0.5225 -> 512 -> 518, over-shrinking.)
    assert VLM.output_size(980, 980, img_num=1) == (980, 980)
    assert VLM.output_size(980, 980, img_num=4) == (714, 714)
    w, h = VLM.output_size(1960, 980, img_num=2)  # 1003520 budget; long side first capped at 980 -> 980x490
    assert (w, h) == (980, 490)


def test_transform_errors():
    with pytest.raises(ValueError, match="min_size"):
        ImageTransform(100, 200, 14)
    with pytest.raises(ValueError, match="multiple of stride"):
        ImageTransform(100, 50, 14)
    with pytest.raises(ValueError, match="positive"):
        SGT_VIT.output_size(0, 10)


def test_masks_resize_nearest_no_new_colours_rgb_bicubic():
    rng = np.random.default_rng(0)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    mask = palette[rng.integers(0, 4, size=(37, 53))]
    out = resize(mask, 16, 24, nearest=True)
    assert out.shape == (24, 16, 3)
    assert {tuple(c) for c in out.reshape(-1, 3)} <= {tuple(c) for c in palette}
    blended = resize(mask, 16, 24)  # bicubic antialiased: border colours appear (why masks must not use it)
    assert not {tuple(c) for c in blended.reshape(-1, 3)} <= {tuple(c) for c in palette}


def test_normalize_range():
    x = np.array([[[0, 127, 255]]], np.uint8)
    np.testing.assert_allclose(normalize(x), [[[-1.0, 127 / 127.5 - 1.0, 1.0]]], rtol=0, atol=1e-7)


def test_patchify_order_and_positions():
    h, w, ps, g = 28, 42, 14, 70
    img = np.arange(h * w * 3, dtype=np.float32).reshape(h, w, 3)
    patches, pos = patchify(img, ps, g)
    assert patches.shape == (6, ps * ps * 3)
    # BAGEL: image (c, h, w) -> reshape(c, h/p, p, w/p, p) -> einsum("chpwq->hwpqc") -> (-1, p*p*c)
    chw = img.transpose(2, 0, 1)
    ref = np.einsum("chpwq->hwpqc", chw.reshape(3, h // ps, ps, w // ps, ps)).reshape(-1, ps * ps * 3)
    np.testing.assert_array_equal(patches, ref)
    np.testing.assert_array_equal(pos, [0, 1, 2, 70, 71, 72])
    # vector order (row-in-patch, col-in-patch, channel): element 3 of patch (1, 2) is pixel (14, 29) channel 0
    assert patches[5, 3] == img[14, 29, 0]
    with pytest.raises(ValueError, match="multiple of patch size"):
        patchify(np.zeros((15, 14, 3)), 14, 70)


def test_transforms_from_config(tiny_config):
    t = Transforms.from_config(tiny_config)
    assert t.latent_stride == vae_stride(tiny_config.model) == 4  # ch_mult (1, 2): 2x VAE, 2x latent patch
    assert latent_grid(32, 20, 4) == (8, 5)
    from sgt_jax.configs_util import load_config

    c7 = load_config("configs/bagel_sgt.py:7b")
    t7 = Transforms.from_config(c7)
    assert t7.latent_stride == 16 and t7.sgt_vit == SGT_VIT and t7.vae == VAE and t7.vlm_vit == VLM
    tiny_config.data.transforms.vae = (36, 16, 6)
    with pytest.raises(ValueError, match="stride 6 must be a multiple of 4"):
        Transforms.from_config(tiny_config)


def test_patchify_matches_the_vit_module_helper():
    from sgt_jax.models import siglip_navit as siglip
    img = np.random.default_rng(0).uniform(-1, 1, (42, 28, 3)).astype(np.float32)
    ours, pos = patchify(img, 14, 70)
    theirs, tpos = siglip.patchify(img, 14, 70)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(pos, tpos)
