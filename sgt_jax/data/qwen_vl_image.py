"""Qwen2.5-VL image preprocessing as numpy (transformers ``Qwen2VLImageProcessor``, PIL backend; used by
OmniGen2's chat pipeline and SGT-OmniGen2 training through ``AutoProcessor``).

1. ``smart_resize``: both sides rounded to a multiple of ``patch_size · merge_size`` (28), then scaled
   (keeping the aspect ratio) into ``[min_pixels, max_pixels]``; SGT-OmniGen2 uses 256·28² .. 1280·28².
2. PIL bicubic resize of the RGB uint8 image, scale to [0, 1], normalise with the OpenAI CLIP mean/std.
3. Patchify: the image is repeated ``temporal_patch_size`` (2) times in time, cut into 14x14 patches, and
   the patches are listed merge unit by merge unit (2x2 neighbouring patches consecutive, units in raster
   order); each patch vector is (channel, time, row, col) flattened. ``grid_thw = (1, H/14, W/14)``.

The rows come out in the processor's order; ``sgt_jax/data/qwen_vl_plan.py`` lays them out in a pack.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SGT_MIN_PIXELS, SGT_MAX_PIXELS = 256 * 28 * 28, 1280 * 28 * 28  # SGT-OmniGen2's AutoProcessor settings
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # the processor's defaults


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The (height, width) the processor resizes to (transformers ``smart_resize``)."""
    if min(height, width) <= 0:
        raise ValueError(f"image size {height}x{width} must be positive")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width}: aspect ratio must be smaller than 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image_chw: np.ndarray, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised image ``[C, H, W]`` -> (patch rows ``[gh·gw, C·T·ps·ps]`` float32, grid ``(1, gh, gw)``)."""
    c, h, w = image_chw.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"image {h}x{w} is not a multiple of patch_size·merge_size = {unit}")
    gh, gw = h // patch_size, w // patch_size
    x = np.asarray(image_chw, np.float32).reshape(c, gh // merge_size, merge_size, patch_size,
                                                  gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, ps, ps)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size,) + x.shape[5:])
    return x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size), (1, gh, gw)


def preprocess(image: Image.Image | np.ndarray, *, min_pixels: int = DEFAULT_MIN_PIXELS,
               max_pixels: int = DEFAULT_MAX_PIXELS, patch_size: int = 14, merge_size: int = 2,
               temporal_patch_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image (PIL or uint8 ``[H, W, 3]``) -> (pixel rows, grid_thw), as the processor computes them."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    pil = pil.convert("RGB")
    h, w = smart_resize(pil.height, pil.width, patch_size * merge_size, min_pixels, max_pixels)
    arr = np.asarray(pil.resize((w, h), Image.BICUBIC), np.float32) * np.float32(1 / 255)
    arr = (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return patchify(arr.transpose(2, 0, 1), patch_size, merge_size, temporal_patch_size)


def preprocess_images(images, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (``pixel_values`` [sum of patches, D], ``image_grid_thw`` [N, 3]), like the processor."""
    rows, grids = zip(*(preprocess(im, **kw) for im in images))
    return np.concatenate(rows, axis=0), np.asarray(grids, np.int64)
