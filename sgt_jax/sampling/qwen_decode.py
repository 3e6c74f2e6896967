"""Qwen2.5-VL (OmniGen2's MLLM) at inference: prompts with images, the DiT condition, and text decoding
with a preallocated KV cache.

* ``prompt_inputs`` turns token ids with **one** image-pad id per image into the model's inputs: each
  placeholder is expanded to the image's ``t·h·w / merge²`` pad tokens (transformers' processor does the
  same), the images are preprocessed (sgt_jax/data/qwen_vl_image.py) into one vision pack, M-RoPE
  positions come from ``mrope_positions``. Token and patch counts are padded to buckets (static shapes:
  one compile per bucket); padding tokens get ``doc = -1`` and are invisible.
* ``QwenEngine.hidden`` returns the last hidden states (after the final norm) and their mask: the DiT
  condition (sgt_jax/models/omnigen2_inputs.py ``mllm_condition``).
* ``QwenEngine.generate`` prefills the prompt into a cache of static capacity (prompt bucket +
  ``max_new_tokens`` rounded up), then decodes one token per step (the token's K/V written at a traced
  slot: one compile per capacity), until a stop id or ``max_new_tokens``. A new token's M-RoPE position
  is ``index + delta`` on all three axes (transformers: ``cache_position + rope_deltas``). Greedy, or
  temperature + nucleus top-p (``engine.sample_logits``). Batch 1, like the official chat pipeline.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.data import qwen_vl_image
from sgt_jax.data import qwen_vl_plan as plan
from sgt_jax.models.attention import TokenMeta
from sgt_jax.models.qwen2_5_vl import VisionInputs
from sgt_jax.models.qwen2_mot import KVCache
from sgt_jax.sampling.engine import StaticGraph, _write, round_up, sample_logits


class PromptInputs(NamedTuple):
    """One prompt, padded to its bucket (leading batch dim 1)."""

    ids: np.ndarray  # int32 [1, T]
    positions: np.ndarray  # int32 [3, 1, T]
    doc: np.ndarray  # int32 [1, T], -1 = padding
    vision: VisionInputs | None
    vision_index: np.ndarray | None  # int32 [1, T], -1 = text
    length: int  # real tokens
    delta: int  # M-RoPE offset of decoded tokens
    grids: np.ndarray  # int [N, 3] the images' (t, h, w) patch grids


def prompt_inputs(cfg, ids: Sequence[int], images: Sequence[np.ndarray] = (), *, min_pixels: int,
                  max_pixels: int, token_bucket: int = 64, patch_bucket: int = 256) -> PromptInputs:
    """Model inputs for ``ids`` holding one ``cfg.tokens.image`` placeholder per image (uint8 RGB)."""
    ids = [int(i) for i in ids]
    img = int(cfg.tokens.image)
    if sum(i == img for i in ids) != len(images):
        raise ValueError(f"the prompt holds {sum(i == img for i in ids)} image placeholders for {len(images)} images")
    v = cfg.vision
    vision = index = None
    grids = np.zeros((0, 3), np.int64)
    if images:
        pixel_values, grids = qwen_vl_image.preprocess_images(list(images), min_pixels=min_pixels,
                                                              max_pixels=max_pixels)
        grids = np.asarray(grids)
        counts = iter(int(t * h * w) // v.spatial_merge_size ** 2 for t, h, w in grids)
        ids = [x for i in ids for x in ([img] * next(counts) if i == img else [i])]
    n = len(ids)
    t_pad = round_up(n, token_bucket)
    padded = np.zeros((1, t_pad), np.int32)
    padded[0, :n] = ids
    valid = np.arange(t_pad)[None] < n
    positions, delta = plan.mrope_positions(padded, grids, image_token_id=img,
                                            spatial_merge_size=v.spatial_merge_size, valid=valid)
    if images:
        patches = int(np.prod(grids, axis=1).sum())
        pack = plan.vision_pack(grids, patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                                window_size=v.window_size, max_patches=round_up(patches, patch_bucket))
        vision = VisionInputs(*(a[None] for a in (plan.gather_patches(pixel_values, pack["source"]),
                                                 pack["image_id"], pack["window_id"], pack["pos_hw"])))
        index = plan.vision_token_index(padded, pack["merged_index"], image_token_id=img, valid=valid)
    doc = np.where(valid, 0, -1).astype(np.int32)
    return PromptInputs(padded, positions, doc, vision, index, n, int(delta[0]), grids)


class QwenEngine:
    """A ``Qwen2_5_VL`` split once into (graphdef, state), with jitted prefill / decode / hidden-state calls
    shared by every engine of the same architecture in the process."""

    def __init__(self, model, cfg):
        self.cfg = cfg
        graphdef, self.state = nnx.split(model)
        static = StaticGraph(graphdef, cfg)
        self._hidden = functools.partial(_hidden_jit, static)
        self._prefill = functools.partial(_prefill_jit, static)
        self._decode = functools.partial(_decode_jit, static)

    def hidden(self, p: PromptInputs):
        """``(last hidden states [1, T, H], mask [1, T] bool)`` of the prompt (the DiT condition)."""
        h = self._hidden(self.state, *_arrays(p))
        return h, jnp.asarray(p.doc >= 0)

    def generate(self, p: PromptInputs, *, max_new_tokens: int, stop_ids: Sequence[int] = (), greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, cache_bucket: int = 64) -> list[int]:
        """Token ids generated after the prompt (the stop token, if reached, not included)."""
        t = p.ids.shape[1]
        capacity = round_up(t + max_new_tokens, cache_bucket)
        logits, cache = self._prefill(self.state, *_arrays(p), jnp.int32(p.length - 1), capacity=capacity)
        key = jax.random.key(seed)
        out: list[int] = []
        stop = {int(s) for s in stop_ids}
        for i in range(max_new_tokens):
            key, sub = jax.random.split(key)
            if i == 0:
                tok = int(sample_logits(logits, sub, greedy=greedy, temperature=jnp.float32(temperature),
                                        top_p=jnp.float32(top_p))[0])
            else:
                scal = jnp.asarray([t + i - 1, p.length + i - 1 + p.delta], jnp.int32)  # slot/order, position
                logits, nxt, cache = self._decode(self.state, cache, jnp.asarray([[out[-1]]], jnp.int32), scal, sub,
                                                  jnp.float32(temperature), jnp.float32(top_p), greedy=greedy)
                tok = int(nxt[0])
            if tok in stop:
                break
            out.append(tok)
        return out


def _arrays(p: PromptInputs):
    vision = None if p.vision is None else VisionInputs(*(jnp.asarray(a) for a in p.vision))
    index = None if p.vision_index is None else jnp.asarray(p.vision_index)
    return jnp.asarray(p.ids), jnp.asarray(p.positions), jnp.asarray(p.doc), vision, index


def _hidden_fn(static, state, ids, positions, doc, vision, index):
    return nnx.merge(static.graphdef, state).hidden_states(ids, positions, doc, vision, index)


def _prefill_fn(static, state, ids, positions, doc, vision, index, last, capacity):
    model = nnx.merge(static.graphdef, state)
    t = ids.shape[1]
    order = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), ids.shape)
    logits_all, _, kv = model.step(ids, positions, order, doc=doc, vision=vision, vision_index=index)
    shape = kv.k.shape[:2] + (capacity,) + kv.k.shape[3:]
    neg = jnp.full((1, capacity), -1, jnp.int32)
    zero = jnp.zeros((1, capacity), jnp.int32)
    empty = KVCache(jnp.zeros(shape, kv.k.dtype), jnp.zeros(shape, kv.v.dtype), TokenMeta(neg, neg, zero, zero))
    return logits_all[:, last], _write(empty, kv, jnp.int32(0))


def _decode_fn(static, state, cache, token, scal, key, temperature, top_p, greedy=True):
    model = nnx.merge(static.graphdef, state)
    slot, pos = scal[0], scal[1]  # the token's cache slot (also its attention order) and M-RoPE position
    one = jnp.ones((1, 1), jnp.int32)
    positions = jnp.broadcast_to(pos * one, (3, 1, 1))
    logits, _, new = model.step(token, positions, slot * one, kv_cache=cache, doc=0 * one)
    nxt = sample_logits(logits[:, -1], key, greedy=greedy, temperature=temperature, top_p=top_p)
    return logits[:, -1], nxt, _write(cache, new, slot)


_hidden_jit = jax.jit(_hidden_fn, static_argnums=(0,))
_prefill_jit = jax.jit(_prefill_fn, static_argnums=(0,), static_argnames=("capacity",))
_decode_jit = jax.jit(_decode_fn, static_argnums=(0,), static_argnames=("greedy",))
