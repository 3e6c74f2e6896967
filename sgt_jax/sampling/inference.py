"""BAGEL inference flows: understanding (text out) and generation (image out) (ByteDance-Seed/Bagel `modeling/bagel/bagel.py`, `inferencer.py`).

``Inferencer`` wraps a loaded model, its tokenizer and the config and builds BAGEL's three contexts:

* text input:  ``cfg_text <- gen`` (before the text); ``gen += text``; ``cfg_img += text``;
* image input: resized with the VAE transform; for generation ``gen += VAE(img)`` then ``gen += ViT(img)``
  (``image_condition="vae_vit"``, BAGEL editing) or only ``gen += ViT(img)`` (``"vit"``: the SGT
  segmentation plan, whose ViT view uses its own transform); then ``cfg_text <- gen``; ``cfg_img``
  never gets images. For understanding only the ViT copy is added (``understand.vit_transform``);
* T2I: gen = [prompt], cfg_text = [] (unconditional), cfg_img = [prompt];
* think mode: a system prompt goes to gen and cfg_img first; after the inputs, text is generated from
  gen and appended to gen only (re-tokenised, new markers) before the image is generated.

All three contexts share one static capacity (they are stacked on the batch axis for CFG), rounded up
to ``cache_bucket`` so a bounded set of shapes is compiled.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.data.transforms import ImageTransform, normalize, resize, vae_stride
from sgt_jax.sampling import blocks, flow
from sgt_jax.sampling.engine import Context, Engine, StaticGraph, empty_context, round_up

# Our wording (BAGEL's prompts ask for reasoning inside <think> ... </think> before answering/drawing).
GEN_THINK_SYSTEM_PROMPT = ("You should first think about the planning process in the mind and then generate "
                           "the image. The planning process is enclosed within <think> </think> tags.")
VLM_THINK_SYSTEM_PROMPT = ("You should first think about the reasoning process in the mind and then provide "
                           "the answer. The reasoning process is enclosed within <think> </think> tags.")
TEXT_PAD = 16


@dataclasses.dataclass
class Contexts:
    gen: Context
    cfg_text: Context
    cfg_img: Context
    out_hw: tuple[int, int] | None  # output image size from the last input image (pixels)


UINT8_MODES = ("round", "truncate")


def to_uint8(image, mode: str = "round") -> np.ndarray:
    """[-1, 1] float image -> uint8: x*0.5+0.5, clamp to [0,1], *255, then rounded to the nearest integer
    ("round") or truncated ("truncate": the official inference code, ByteDance-Seed/Bagel ``inferencer.py``
    ``decode_image``, whose ``.to(torch.uint8)`` drops the fraction; its pixels are 0.5 darker on average)."""
    if mode not in UINT8_MODES:
        raise ValueError(f"config.generate.uint8 must be one of {UINT8_MODES}, got {mode!r}")
    scaled = jnp.clip(jnp.asarray(image, jnp.float32) * 0.5 + 0.5, 0, 1) * 255
    return np.asarray(jnp.round(scaled) if mode == "round" else jnp.floor(scaled)).astype(np.uint8)


class Inferencer:
    family = "bagel"  # OmniGen2's counterpart: sgt_jax/sampling/omnigen2_inference.py

    def __init__(self, model, tokenizer, config):
        self.model = model
        self.tok = tokenizer
        self.config = config
        self.engine = Engine(model)
        m = config.model
        self.tokens = m.tokens
        self.patch_size, self.vit_grid = m.vit.patch_size, m.vit.max_patches_per_side
        self.latent_p, self.max_latent = m.latent_patch_size, m.max_latent_size
        self.stride = vae_stride(m)
        self.vae_transform = ImageTransform(*config.data.transforms.vae)
        graphdef, state = nnx.split(model)
        static = StaticGraph(graphdef, model.cfg)
        self._vae_encode = functools.partial(_vae_encode_jit, static)
        self._vae_decode = functools.partial(_vae_decode_jit, static)
        self._state = state
        self._combine = _combine_jit

    # ---- sizes and blocks ----
    def _text_block(self, text: str):
        return blocks.text_block(self.tok.encode(text, where="prompt"), self.tokens, TEXT_PAD)

    def _vit_block(self, image_u8: np.ndarray, transform: ImageTransform):
        h, w = image_u8.shape[:2]
        nw, nh = transform.output_size(w, h)
        return blocks.vit_block(normalize(resize(image_u8, nw, nh)), self.tokens, self.patch_size, self.vit_grid)

    def _vae_block(self, image_u8: np.ndarray, key, sample: bool):
        h, w = image_u8.shape[:2]
        if h % self.stride or w % self.stride:
            raise ValueError(f"VAE image {h}x{w} must have sides multiple of {self.stride}")
        lat = self._vae_encode(self._state, jnp.asarray(normalize(image_u8))[None], key, sample=sample)
        return blocks.vae_block(np.asarray(lat[0]), h // self.stride, w // self.stride, self.max_latent, self.tokens)

    # ---- contexts ----
    def build_contexts(self, inputs, *, for_generation: bool, image_condition: str = "vae_vit",
                       vit_transform=None, extra_tokens: int = 0, cache_bucket: int = 64, think: bool = False,
                       key=None, vae_sample: bool = True) -> Contexts:
        """Process ``inputs`` (a list of ``str`` or uint8 ``[H, W, 3]`` arrays) into the three contexts."""
        if image_condition not in ("vae_vit", "vit"):
            raise ValueError(f"image_condition must be 'vae_vit' or 'vit', got {image_condition!r}")
        vit_tr = ImageTransform(*vit_transform) if vit_transform else None
        key = jax.random.key(0) if key is None else key
        plan = []  # (target contexts, block, rope_advance)
        out_hw = None
        if think:
            sys_prompt = GEN_THINK_SYSTEM_PROMPT if for_generation else VLM_THINK_SYSTEM_PROMPT
            plan.append(("gen+img", self._text_block(sys_prompt)))
        for item in inputs:
            if isinstance(item, str):
                plan.append(("snap", None))
                plan.append(("gen+img", self._text_block(item)))
                continue
            image = np.asarray(item)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"input images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
            if for_generation:
                nw, nh = self.vae_transform.output_size(image.shape[1], image.shape[0])
                vae_img = resize(image, nw, nh)
                out_hw = (nh, nw)
                if image_condition == "vae_vit":
                    key, sub = jax.random.split(key)
                    plan.append(("gen", self._vae_block(vae_img, sub, vae_sample)))
                    plan.append(("gen", self._vit_block(vae_img, vit_tr or ImageTransform(980, 224, 14))))
                else:
                    plan.append(("gen", self._vit_block(image, vit_tr or ImageTransform(224, 224, 14))))
                plan.append(("snap", None))
            else:
                plan.append(("gen", self._vit_block(image, vit_tr or ImageTransform(980, 224, 14))))
        need = sum(b["tokens"].shape[1] for tgt, b in plan if b is not None and tgt != "snap")
        capacity = round_up(need + extra_tokens + TEXT_PAD, cache_bucket)
        empty = empty_context(self.model, capacity)
        gen = cfg_text = cfg_img = empty
        for tgt, blk in plan:
            if tgt == "snap":
                cfg_text = gen
                continue
            gen = self.engine.append(gen, blk, rope_advance=blk["rope_advance"])
            if tgt == "gen+img":
                cfg_img = self.engine.append(cfg_img, blk, rope_advance=blk["rope_advance"])
        return Contexts(gen, cfg_text, cfg_img, out_hw)

    # ---- text ----
    def generate_text(self, ctx: Context, *, max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> tuple[str, list[int]]:
        """BAGEL ``gen_text``: prime with ``<|im_start|>`` and decode until ``<|im_end|>`` or the limit.

        The generated tokens are cached in a copy of ``ctx``; the caller's context is unchanged."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if ctx.length + max_new_tokens > ctx.capacity:
            raise ValueError(f"context of {ctx.length} tokens + {max_new_tokens} new > cache capacity "
                             f"{ctx.capacity}")
        key = jax.random.key(seed)
        token, out = self.tokens.bos, []
        for _ in range(max_new_tokens):
            key, sub = jax.random.split(key)
            _, nxt, ctx = self.engine.decode_step(ctx, token, sub, greedy=not do_sample, temperature=temperature,
                                                  top_p=top_p)
            token = int(nxt)
            if token == self.tokens.eos:
                break
            out.append(token)
        return self.tok.decode(out, skip_special_tokens=True), out

    def understand(self, images, prompt: str, *, max_new_tokens: int, do_sample=False, temperature=1.0,
                   top_p=1.0, seed=0, vit_transform=None, cache_bucket=64, think=False) -> str:
        ctxs = self.build_contexts(list(images) + [prompt], for_generation=False, vit_transform=vit_transform,
                                   extra_tokens=max_new_tokens, cache_bucket=cache_bucket, think=think)
        text, _ = self.generate_text(ctxs.gen, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature, top_p=top_p, seed=seed)
        return text

    # ---- images ----
    def generate_image(self, ctxs: Contexts, *, height: int, width: int, cfg: flow.CfgSettings,
                       num_timesteps: int, timestep_shift: float, seed: int, return_latents: bool = False):
        """Flow-matching sampling with CFG from noise to a uint8 image ``[height, width, 3]``."""
        cfg.validate()
        if height % self.stride or width % self.stride:
            raise ValueError(f"output size {height}x{width} must be a multiple of {self.stride}")
        h, w = height // self.stride, width // self.stride
        q = blocks.latent_query_block(h, w, self.max_latent, self.tokens)
        ts, dts = flow.timestep_schedule(num_timesteps, timestep_shift)
        x = jax.random.normal(jax.random.key(seed), (h * w, self.model.patch_latent_dim), jnp.float32)
        for t, dt in zip(ts, dts):
            s_txt, s_img = cfg.scales_at(float(t))
            branches = [ctxs.gen]
            if s_txt > 1.0:
                branches.append(ctxs.cfg_text)
                if s_img > 1.0:
                    branches.append(ctxs.cfg_img)
            v = self.engine.velocity(branches, q, x, float(t))
            if len(branches) == 1:
                v = v[0]
            else:
                v = self._combine(v[0], v[1], v[2] if len(branches) == 3 else v[0], jnp.float32(s_txt),
                                  jnp.float32(s_img), renorm_type=cfg.renorm_type, renorm_min=jnp.float32(cfg.renorm_min))
            x = flow.euler_step(x, v, jnp.float32(dt))
        image = self._vae_decode(self._state, x[None], hw=(h, w), p=self.latent_p)
        image = to_uint8(image[0], str(self.config.generate.uint8))
        return (image, np.asarray(x)) if return_latents else image

    def think(self, ctxs: Contexts, *, max_new_tokens: int, seed: int = 0) -> tuple[Contexts, str]:
        """Generate reasoning text from gen (greedy) and append it to gen only."""
        text, _ = self.generate_text(ctxs.gen, max_new_tokens=max_new_tokens, seed=seed)
        blk = self._text_block(text) if text.strip() else None
        if blk is None:
            return ctxs, text
        gen = self.engine.append(ctxs.gen, blk, rope_advance=blk["rope_advance"])
        return dataclasses.replace(ctxs, gen=gen), text


def _vae_encode_fn(static, state, image, key, sample=True):
    from sgt_jax.models.flux_vae import patchify_latent

    model = nnx.merge(static.graphdef, state)
    mean, logvar = model.vae.encode_stats(image.astype(model.vae.dtype or jnp.float32))
    z = model.vae.sample(mean, logvar, key) if sample else mean
    return patchify_latent(model.vae.scale(z), model.cfg.latent_patch_size)


def _vae_decode_fn(static, state, x, hw, p):
    from sgt_jax.models.flux_vae import unpatchify_latent

    model = nnx.merge(static.graphdef, state)
    z = unpatchify_latent(x, hw[0], hw[1], p)
    return model.vae.decode_scaled(z).astype(jnp.float32)


_vae_encode_jit = jax.jit(_vae_encode_fn, static_argnums=(0,), static_argnames=("sample",))
_vae_decode_jit = jax.jit(_vae_decode_fn, static_argnums=(0,), static_argnames=("hw", "p"))
_combine_jit = jax.jit(flow.combine_cfg, static_argnames=("renorm_type",))
