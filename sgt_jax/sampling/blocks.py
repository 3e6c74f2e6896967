"""Host-side construction of the blocks appended to an inference context (ByteDance-Seed/Bagel `modeling/bagel/bagel.py`, `inferencer.py`).

A block is a dict of numpy arrays in the packed-batch layout (docs/interfaces.md §1) with B = 1 —
``tokens``, ``kind`` (und tokens first, latent tokens last), optional ``vit_patches``/``vit_pos``/
``vit_image``/``vit_row`` and ``latent_pos``/``latents`` — plus what the engine needs to place it in a
context: ``mode`` (attention mode per token), ``rel_order``/``rel_rope`` (offsets from the context's
counters), ``n_real`` (tokens the context keeps) and ``rope_advance`` (how far the context's RoPE
counter moves).

| block         | tokens (physical order)                    | RoPE            | mode   | rope_advance |
|---------------|--------------------------------------------|-----------------|--------|--------------|
| text          | <|im_start|> ids <|im_end|> [pads]         | rope .. rope+n-1 | causal | n            |
| ViT image     | <|vision_start|> ViT tokens <|vision_end|>  | all rope        | full   | 1            |
| VAE image     | <|vision_start|> <|vision_end|> latents    | all rope        | full   | 1            |
| latent query  | <|vision_start|> <|vision_end|> latents    | all rope        | noise  | (not cached) |

Text blocks are padded to a multiple of ``pad_to`` with pad tokens (kind 0, doc -1: invisible), so
prompts of similar length share one compiled shape. Image blocks' order offsets follow the original
token order (start marker, image tokens, end marker) whatever the physical layout.
"""

from __future__ import annotations

import numpy as np

from sgt_jax.models.attention import CAUSAL, FULL, NOISE
from sgt_jax.models.bagel import KIND_LATENT, KIND_TEXT, KIND_VIT


def _b(a, dtype=np.int32):
    return np.asarray(a, dtype)[None]


def text_block(ids, tokens_cfg, pad_to: int = 16, *, close: bool = True) -> dict:
    """``<|im_start|> ids <|im_end|>`` (``close=False`` leaves out ``<|im_end|>``)."""
    seq = [int(tokens_cfg.bos)] + [int(i) for i in ids] + ([int(tokens_cfg.eos)] if close else [])
    n = len(seq)
    tpad = -(-n // pad_to) * pad_to if pad_to > 1 else n
    tokens = np.zeros(tpad, np.int32)
    tokens[:n] = seq
    kind = np.zeros(tpad, np.int32)
    kind[:n] = KIND_TEXT
    ar = np.arange(tpad, dtype=np.int32)
    return dict(tokens=_b(tokens), kind=_b(kind), mode=_b(np.full(tpad, CAUSAL)), rel_order=_b(ar),
                rel_rope=_b(np.where(ar < n, ar, 0)), n_real=n, rope_advance=n)


def vit_block(image: np.ndarray, tokens_cfg, patch_size: int, max_patches_per_side: int) -> dict:
    """ViT image block from a normalised float image [H, W, 3] in [-1, 1] (sides multiples of ``patch_size``)."""
    from sgt_jax.data.transforms import patchify

    patches, pos = patchify(np.asarray(image, np.float32), patch_size, max_patches_per_side)
    n = len(pos)
    t = n + 2
    tokens = np.zeros(t, np.int32)
    tokens[0], tokens[-1] = int(tokens_cfg.vision_start), int(tokens_cfg.vision_end)
    kind = np.full(t, KIND_VIT, np.int32)
    kind[0] = kind[-1] = KIND_TEXT
    vit_row = np.zeros(t, np.int32)
    vit_row[1:-1] = np.arange(n)
    return dict(tokens=_b(tokens), kind=_b(kind), vit_patches=_b(patches, np.float32), vit_pos=_b(pos),
                vit_image=_b(np.zeros(n)), vit_row=_b(vit_row), mode=_b(np.full(t, FULL)),
                rel_order=_b(np.arange(t)), rel_rope=_b(np.zeros(t)), n_real=t, rope_advance=1)


def _latent_layout(h: int, w: int, max_latent_size: int, tokens_cfg, mode: int) -> dict:
    if h > max_latent_size or w > max_latent_size:
        raise ValueError(f"latent grid {h}x{w} exceeds model.max_latent_size={max_latent_size} per side")
    z = h * w
    t = z + 2
    tokens = np.zeros(t, np.int32)
    tokens[0], tokens[1] = int(tokens_cfg.vision_start), int(tokens_cfg.vision_end)
    kind = np.full(t, KIND_LATENT, np.int32)
    kind[:2] = KIND_TEXT
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    latent_pos = (rows * max_latent_size + cols).reshape(-1)
    rel_order = np.concatenate([[0, z + 1], np.arange(1, z + 1)])
    return dict(tokens=_b(tokens), kind=_b(kind), latent_pos=_b(latent_pos), mode=_b(np.full(t, mode)),
                rel_order=_b(rel_order), rel_rope=_b(np.zeros(t)), n_real=t, rope_advance=1)


def vae_block(latents: np.ndarray, h: int, w: int, max_latent_size: int, tokens_cfg) -> dict:
    """Clean (t = 0) VAE image block from model-space patchified latents ``[h*w, p*p*zc]``."""
    latents = np.asarray(latents, np.float32)
    if latents.shape[0] != h * w:
        raise ValueError(f"{latents.shape[0]} latent tokens do not form a {h}x{w} grid")
    blk = _latent_layout(h, w, max_latent_size, tokens_cfg, FULL)
    blk["latents"] = latents[None]
    return blk


def latent_query_block(h: int, w: int, max_latent_size: int, tokens_cfg) -> dict:
    """The generation query block (its latents are supplied at each denoising step)."""
    return _latent_layout(h, w, max_latent_size, tokens_cfg, NOISE)
