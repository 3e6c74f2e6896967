"""Image sizing, resizing, normalisation and ViT patchify (ByteDance-Seed/Bagel `data/transforms.py`, song2yu/SGT `BAGEL/data/sam_190k.py`).

``ImageTransform(max_size, min_size, stride, max_pixels)`` is BAGEL's rule with SGT's corrected max-pixels
step:
1. scale = min(max/long, 1), then max(scale, min/short) (min wins); each side = round to the NEAREST multiple of
   ``stride`` (at least ``stride``);
2. if w·h > max_pixels / img_num: rescale the ORIGINAL size by the area factor sqrt((max_pixels/img_num)/(W·H))
   (the official code applies the area ratio as a linear factor to the already-resized size, which
   over-shrinks; SGT fixed it, song2yu/SGT `BAGEL/data/transforms.py`). Rounding to the stride may leave the result a few percent
   above the pixel budget; the packer's budgets, not this rule, are what must hold;
3. if the long side is still > max, rescale the current size to max.

RGB inputs are resized bicubic with antialiasing (PIL's BICUBIC filter widens its support when
downsampling, which is what torchvision does for PIL images); targets that are label/colour maps are
resized NEAREST so that no colour appears that was not in the map. Pixels go to [-1, 1] (mean 0.5, std 0.5).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image


def _divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(w: int, h: int, scale: float, stride: int) -> tuple[int, int]:
    return _divisible(round(w * scale), stride), _divisible(round(h * scale), stride)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """BAGEL's ImageTransform sizing rule (SGT-corrected). ``max_pixels`` is for ONE image."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024

    def __post_init__(self):
        if not (0 < self.min_size <= self.max_size) or self.stride <= 0 or self.max_pixels <= 0:
            raise ValueError(f"bad ImageTransform {self}: need 0 < min_size <= max_size, stride > 0, max_pixels > 0")
        if self.max_size % self.stride:
            raise ValueError(f"ImageTransform max_size {self.max_size} is not a multiple of stride {self.stride}")

    def output_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        """(new_width, new_height) for an input of (width, height), with ``img_num`` images sharing max_pixels."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        nw, nh = _apply_scale(width, height, scale, self.stride)
        budget = self.max_pixels / max(1, img_num)
        if nw * nh > budget:
            nw, nh = _apply_scale(width, height, math.sqrt(budget / (width * height)), self.stride)
        if max(nw, nh) > self.max_size:
            nw, nh = _apply_scale(nw, nh, self.max_size / max(nw, nh), self.stride)
        return nw, nh

    def __call__(self, image: np.ndarray, img_num: int = 1, *, nearest: bool = False) -> np.ndarray:
        """uint8 [H,W,3] -> float32 [h,w,3] in [-1,1] at :meth:`output_size`. ``nearest`` for label maps."""
        h, w = image.shape[:2]
        nw, nh = self.output_size(w, h, img_num)
        return normalize(resize(image, nw, nh, nearest=nearest))


def resize(image: np.ndarray, width: int, height: int, *, nearest: bool = False) -> np.ndarray:
    """uint8 HWC resize with PIL: bicubic (antialiased) for photos, nearest for label/colour maps."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"resize expects uint8 [H,W,3], got {image.dtype} {image.shape}")
    if image.shape[1] == width and image.shape[0] == height:
        return image
    pil = Image.fromarray(image)
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return np.asarray(pil.resize((width, height), resample=method))


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]: (x/255 - 0.5) / 0.5."""
    return (image.astype(np.float32) / 255.0 - 0.5) / 0.5


def patchify(image: np.ndarray, patch_size: int, max_patches_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """[h,w,3] -> (patches [n, ps·ps·3] in (row-in-patch, col-in-patch, channel) order, pos [n] = row·G + col).

    Patches are row-major over the patch grid (Bagel: data/data_utils.py patchify,
    get_flattened_position_ids_extrapolate). Sides must be multiples of ``patch_size``.
    """
    h, w, c = image.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a multiple of patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    if max(gh, gw) > max_patches_per_side:
        raise ValueError(f"image {h}x{w} gives a {gh}x{gw} patch grid > max_patches_per_side {max_patches_per_side}")
    x = image.reshape(gh, patch_size, gw, patch_size, c).transpose(0, 2, 1, 3, 4)
    patches = x.reshape(gh * gw, patch_size * patch_size * c)
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return patches, (rows * max_patches_per_side + cols).reshape(-1).astype(np.int32)


def latent_grid(height: int, width: int, stride: int) -> tuple[int, int]:
    """Latent-token grid (h, w) of a VAE image; ``stride`` = VAE downsample x latent patch size."""
    if height % stride or width % stride:
        raise ValueError(f"VAE image {height}x{width} is not a multiple of {stride}")
    return height // stride, width // stride


def vae_stride(model_cfg) -> int:
    """Pixels per latent token side: 2^(len(ch_mult)-1) VAE downsampling x the latent patch size (16 for FLUX)."""
    return 2 ** (len(model_cfg.vae.ch_mult) - 1) * model_cfg.latent_patch_size


@dataclasses.dataclass(frozen=True)
class Transforms:
    """The three transforms of a run, built from ``config.data.transforms`` (see configs/bagel_sgt.py)."""

    sgt_vit: ImageTransform
    vae: ImageTransform
    vlm_vit: ImageTransform
    patch_size: int
    max_patches_per_side: int
    latent_stride: int
    max_latent_size: int

    @classmethod
    def from_config(cls, config) -> "Transforms":
        t, m = config.data.transforms, config.model
        ps, stride = m.vit.patch_size, vae_stride(m)
        out = cls(
            sgt_vit=ImageTransform(*t.sgt_vit),
            vae=ImageTransform(*t.vae),
            vlm_vit=ImageTransform(*t.vlm_vit, max_pixels=t.vlm_max_pixels),
            patch_size=ps, max_patches_per_side=m.vit.max_patches_per_side,
            latent_stride=stride, max_latent_size=m.max_latent_size,
        )
        for name, tr, need in (("sgt_vit", out.sgt_vit, ps), ("vlm_vit", out.vlm_vit, ps), ("vae", out.vae, stride)):
            if tr.stride % need:
                raise ValueError(f"config.data.transforms.{name} stride {tr.stride} must be a multiple of {need}")
        for name, tr in (("sgt_vit", out.sgt_vit), ("vlm_vit", out.vlm_vit)):
            if tr.max_size > ps * m.vit.max_patches_per_side:
                raise ValueError(f"config.data.transforms.{name} max {tr.max_size} > patch_size x "
                                 f"max_patches_per_side = {ps * m.vit.max_patches_per_side}")
        if out.vae.max_size > stride * m.max_latent_size:
            raise ValueError(f"config.data.transforms.vae max {out.vae.max_size} > latent stride x max_latent_size "
                             f"= {stride * m.max_latent_size}")
        return out
