"""OmniGen2 image generation around the DiT: resolution rules, reference latents, the guided denoising loop
with the CFG passes stacked into one model call per step, and decoding.

Official code (VectorSpaceLab/OmniGen2): ``omnigen2/pipelines/omnigen2/pipeline_omnigen2.py``
(``OmniGen2Pipeline.__call__`` / ``processing``) and ``omnigen2/pipelines/image_processor.py``.

* **Resolution** (``fit_size``): a size is scaled down (never up) so that its pixel count is at most
  ``max_pixels`` and its longest side at most ``max_side``, then each side is floored to a multiple of 16.
  Reference images are resized to that size with PIL Lanczos. With exactly one reference image (and
  ``align_res``) the output takes that reference's preprocessed size; otherwise the requested size is
  fitted the same way, generated, and the decoded image resized bilinearly back to the request.
* **Passes**: the official pipeline calls the transformer once per CFG pass (cond / negative + refs /
  negative without refs). Here the passes a step needs are stacked on the batch axis of one call; the
  prompt and negative-prompt conditions are padded to one length (their masks hide the padding), the
  unconditional row's reference slots are empty (``hw = (0, 0)``). Attention is masked per row, so each
  row computes what its separate call would (up to float summation order; tested against the PyTorch
  reference's separate calls in tests/parity/test_omnigen2_denoise.py).
* **Noise**: ``N(0, 1)`` latents of the target size from ``jax.random.key(seed)`` (not torch's generator:
  the same seed gives other noise than the official code).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from sgt_jax.models import omnigen2_inputs as inputs
from sgt_jax.sampling import omnigen2_flow as flow
from sgt_jax.sampling.engine import StaticGraph

def fit_size(height: int, width: int, max_pixels: int, max_side: int, multiple: int = 16) -> tuple[int, int]:
    """The official ``get_new_height_width``: ratio = min(sqrt(max_pixels / (h·w)), max_side / max(h, w), 1),
    then each side floored to a multiple of ``multiple`` (at least ``multiple``; 16 = the FLUX VAE's 8 x the
    DiT's patch 2)."""
    ratio = min((max_pixels / (height * width)) ** 0.5, max_side / max(height, width), 1.0)
    return (max(multiple, int(height * ratio) // multiple * multiple),
            max(multiple, int(width * ratio) // multiple * multiple))


def preprocess_reference(image: np.ndarray, max_pixels: int, max_side: int, multiple: int = 16) -> np.ndarray:
    """uint8 RGB -> float32 ``[H', W', 3]`` in [-1, 1] at the fitted size (PIL Lanczos)."""
    h, w = fit_size(image.shape[0], image.shape[1], max_pixels, max_side, multiple)
    if (h, w) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS))
    return image.astype(np.float32) / 127.5 - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8 (diffusers ``postprocess``: (x/2 + 0.5) clamped, x·255 rounded)."""
    return np.round(np.clip(np.asarray(image, np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def resize_back(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


class Conditions(NamedTuple):
    """What the passes of one request see (batch 1). ``text`` / ``neg_text``: ``[1, L, D]`` MLLM hidden
    states with masks ``[1, L]``; ``refs``: ``(tokens [1, R, M, p·p·C], hw [1, R, 2])`` or None."""

    text: jax.Array
    mask: jax.Array
    neg_text: jax.Array | None
    neg_mask: jax.Array | None
    refs: tuple | None


def _pad_to(a, length):
    return jnp.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2))


def stacked_velocities(call, x_hw, c: Conditions):
    """``velocities(x, t, passes)`` for ``omnigen2_flow.denoise``: the passes stacked into one call of
    ``call(x_tokens, x_hw, t, text, mask, ref_tokens, ref_hw)`` (the DiT's signature)."""
    length = max(c.text.shape[1], 0 if c.neg_text is None else c.neg_text.shape[1])
    text = {"cond": (_pad_to(c.text, length), _pad_to(c.mask, length))}
    if c.neg_text is not None:
        neg = (_pad_to(c.neg_text, length), _pad_to(c.neg_mask, length))
        text["neg_refs"] = text["uncond"] = neg
    refs = None
    if c.refs is not None:
        tok, hw = (jnp.asarray(a) for a in c.refs)
        refs = {"cond": (tok, hw), "neg_refs": (tok, hw), "uncond": (jnp.zeros_like(tok), jnp.zeros_like(hw))}

    def velocities(x, t, passes):
        k = len(passes)
        txt, msk = (jnp.concatenate(a, axis=0) for a in zip(*(text[p] for p in passes)))
        rt = rh = None
        if refs is not None:
            rt, rh = (jnp.concatenate(a, axis=0) for a in zip(*(refs[p] for p in passes)))
        v = call(jnp.repeat(x, k, axis=0), jnp.repeat(x_hw, k, axis=0), jnp.repeat(t, k, axis=0), txt, msk, rt, rh)
        return {p: v[i:i + 1].astype(x.dtype) for i, p in enumerate(passes)}

    return velocities


class DitEngine:
    """The DiT split once; one jitted call shared by every engine of the same architecture."""

    def __init__(self, dit):
        graphdef, self.state = nnx.split(dit)
        self.cfg = dit.cfg
        self.call = functools.partial(_dit_jit, StaticGraph(graphdef, dit.cfg), self.state)

    def sample(self, noise_tokens, x_hw, c: Conditions, *, num_steps: int, text_scale: float, image_scale: float,
               cfg_range=(0.0, 1.0), progress=None):
        """Tokens ``[1, N, p·p·C]`` of the generated latent (the official loop; see omnigen2_flow)."""
        h, w = (int(a) for a in np.asarray(x_hw)[0])
        p = int(self.cfg.patch_size)
        ts = flow.timesteps(num_steps, (h * p) * (w * p))  # latent pixels, not patch tokens
        if text_scale > 1.0 and c.neg_text is None:
            raise ValueError("text guidance needs the negative-prompt condition")
        return flow.denoise(stacked_velocities(self.call, jnp.asarray(x_hw), c), jnp.asarray(noise_tokens), ts,
                            text_scale=text_scale, image_scale=image_scale, has_refs=c.refs is not None,
                            cfg_range=cfg_range, progress=progress)


def noise_tokens(key, height: int, width: int, vae_factor: int, patch: int, channels: int):
    """``N(0, 1)`` latent of an image of ``height x width`` pixels as tokens ``[1, N, p·p·C]`` + ``hw``."""
    z = np.asarray(jax.random.normal(key, (height // vae_factor, width // vae_factor, channels), jnp.float32))
    return inputs.pack_latents([z], patch)


def _dit_fn(static, state, *args):
    return nnx.merge(static.graphdef, state)(*args)


_dit_jit = jax.jit(_dit_fn, static_argnums=(0,))
