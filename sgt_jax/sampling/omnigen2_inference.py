"""OmniGen2 inference behind the same entry points as BAGEL's ``Inferencer`` (sgt_jax/sampling/cli.py,
sgt_jax/eval/cli.py): ``understand`` (VL chat), ``generate_one`` (text to image, editing, segmentation by
generation).

Prompts (token ids built segment by segment between special tokens, which is how a BPE tokenizer splits a
templated string):

* text to image / editing (VectorSpaceLab/OmniGen2 ``pipeline_omnigen2.py``, the training template of
  ``omnigen2_train_dataset.py``): ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}
  <|im_end|>\\n``, no assistant header; the MLLM sees text only, reference images reach the DiT as VAE
  latents. The negative prompt uses the same template.
* segmentation by generation (song2yu/SGT ``OmniGen2/omnigen2/dataset/omnigen2_train_dataset.py``
  ``process_sam``): the image goes to the MLLM only, ``user\\n<img1>: <|vision_start|><|image_pad|>...
  <|vision_end|>{instruction}<|im_end|>\\n<|im_start|>assistant\\n``; the condition keeps every position
  (image tokens too) and the DiT gets no reference latents; the output has the input's fitted size.
* understanding: Qwen2.5-VL-Instruct's chat template (the images before the question in the user turn,
  the assistant header open), ``config.data.omnigen2.vqa_system_prompt``; decoding stops at
  ``<|im_end|>``, ``<|endoftext|>`` or OmniGen2's ``<|img|>`` (those the tokenizer has).

Generation settings: ``config.generate.omnigen2`` (num_steps, text/image guidance scales, cfg_range,
negative_prompt, max_pixels, max_input_side, align_res) plus the shared ``generate.height/width/seed``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models import omnigen2_inputs as inputs
from sgt_jax.sampling import omnigen2_sampler as sampler
from sgt_jax.sampling import qwen_decode
from sgt_jax.sampling.engine import StaticGraph

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|img|>")


class OmniGen2Inferencer:
    family = "omnigen2"

    def __init__(self, model, tokenizer, config):
        self.config = config
        self.tok = tokenizer
        m = config.model
        self.mcfg, self.dcfg = m.mllm, m.dit
        self.qwen = qwen_decode.QwenEngine(model.mllm, m.mllm)
        self.dit = sampler.DitEngine(model.dit)
        graphdef, state = nnx.split(model.vae)
        static = StaticGraph(graphdef, m.vae)
        self._encode = functools.partial(_encode_jit, static, state)
        self._decode = functools.partial(_decode_jit, static, state)
        self.vae_factor = int(model.vae.downsample)
        self.patch = int(m.dit.patch_size)
        self.multiple = self.vae_factor * self.patch
        self.stop_ids = [i for i in (tokenizer.token_id(s) for s in STOP_TOKENS) if i is not None]
        for role in ("vision_start", "vision_end"):
            if getattr(tokenizer, role) != int(self.mcfg.tokens[role]):
                raise ValueError(f"tokenizer {tokenizer.source!r}: {role} id {getattr(tokenizer, role)} != the "
                                 f"MLLM's {self.mcfg.tokens[role]} (config.model.mllm.tokens.{role})")

    # ---- prompts ----
    def chat_ids(self, system: str, user: str, num_images: int = 0, *, image_labels: bool, assistant: bool):
        """The chat template as ids, one image placeholder per image (see the module docstring)."""
        enc, s, e = self.tok.encode, self.tok.bos, self.tok.eos
        t = self.mcfg.tokens
        ids = [s] + enc("system\n" + system, where="system prompt") + [e] + enc("\n") + [s]
        head = "user\n"
        for i in range(num_images):
            ids += enc(head + (f"<img{i + 1}>: " if image_labels else "")) + [t.vision_start, t.image, t.vision_end]
            head = ""
        ids += enc(head + user, where="prompt") + [e] + enc("\n")
        return ids + ([s] + enc("assistant\n") if assistant else [])

    def _prompt(self, ids, images=()):
        return qwen_decode.prompt_inputs(self.mcfg, ids, list(images), min_pixels=int(self.mcfg.min_pixels),
                                         max_pixels=int(self.mcfg.max_pixels))

    def condition(self, ids, images=()):
        """The DiT condition ``(hidden [1, L, D], mask [1, L])`` of a prompt."""
        h, mask = self.qwen.hidden(self._prompt(ids, images))
        return inputs.mllm_condition(h, mask, max_len=int(self.dcfg.axes_lens[0]) - 128)

    # ---- understanding ----
    def understand(self, images, prompt: str, *, max_new_tokens: int, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, cache_bucket: int = 64,
                   think: bool = False, vit_transform=None) -> str:
        """Greedy (or sampled) answer to ``prompt`` about ``images`` (uint8 arrays or PIL images).
        ``vit_transform`` (BAGEL's ViT resize) is not used: the MLLM's pixel range is
        ``config.model.mllm.min_pixels / max_pixels``."""
        del vit_transform
        if think:
            raise ValueError("understand.think is BAGEL's think mode; OmniGen2 has none (set it to False)")
        system = str(self.config.data.omnigen2.vqa_system_prompt)
        ids = self.chat_ids(system, prompt, len(images), image_labels=False, assistant=True)
        out = self.qwen.generate(self._prompt(ids, images), max_new_tokens=int(max_new_tokens),
                                 stop_ids=self.stop_ids, greedy=not do_sample, temperature=temperature, top_p=top_p,
                                 seed=seed, cache_bucket=int(cache_bucket))
        return self.tok.decode(out, skip_special_tokens=True).strip()

    # ---- generation ----
    def generate_one(self, prompt: str, images, seed: int, *, height=None, width=None, segment: bool = False,
                     progress=None):
        """One image: text to image, editing (``images`` as references) or, with ``segment``, SGT's
        segmentation by generation (one image, to the MLLM). Returns ``(uint8 [H, W, 3], info)``."""
        g, o = self.config.generate, self.config.generate.omnigen2
        if g.think:
            raise ValueError("generate.think is BAGEL's think mode; OmniGen2 has none (set it to False)")
        system = str(self.config.data.omnigen2.system_prompt)
        tg, ig = float(o.text_guidance_scale), float(o.image_guidance_scale)
        key_ref, key_noise = jax.random.split(jax.random.key(seed))
        refs, ref_sizes = None, []
        if segment:
            if len(images) != 1:
                raise ValueError(f"segmentation by generation takes one image, got {len(images)}")
            text, mask = self.condition(self.chat_ids(system, prompt, 1, image_labels=True, assistant=True), images)
            out_hw = sampler.fit_size(*images[0].shape[:2], int(o.max_pixels), int(o.max_input_side), self.multiple)
            want_hw = out_hw
        else:
            text, mask = self.condition(self.chat_ids(system, prompt, image_labels=False, assistant=False))
            latents = []
            for k, im in enumerate(images):
                x = sampler.preprocess_reference(im, int(o.max_pixels), int(o.max_input_side), self.multiple)
                ref_sizes.append(x.shape[:2])
                latents.append(np.asarray(self._encode(jnp.asarray(x)[None], jax.random.fold_in(key_ref, k)))[0])
            if latents:
                refs = inputs.pack_references([latents], self.patch)
            want_hw = (int(height or g.height), int(width or g.width))
            if len(images) == 1 and bool(o.align_res):
                want_hw = out_hw = tuple(ref_sizes[0])
            else:
                out_hw = sampler.fit_size(*want_hw, int(o.max_pixels), 10 ** 9, self.multiple)
        if refs is None:
            ig = 1.0  # the official pipeline: no input images -> no image guidance
        neg = neg_mask = None
        if tg > 1.0:
            neg, neg_mask = self.condition(self.chat_ids(system, str(o.negative_prompt), image_labels=False,
                                                         assistant=False))
        x_tok, x_hw = sampler.noise_tokens(key_noise, *out_hw, self.vae_factor, self.patch, int(self.dcfg.in_channels))
        tokens = self.dit.sample(x_tok, x_hw, sampler.Conditions(text, mask, neg, neg_mask, refs),
                                 num_steps=int(o.num_steps), text_scale=tg, image_scale=ig,
                                 cfg_range=tuple(float(v) for v in o.cfg_range), progress=progress)
        z = inputs.unpack_latents(np.asarray(tokens), x_hw, self.patch)[0]
        image = sampler.resize_back(sampler.to_uint8(np.asarray(self._decode(jnp.asarray(z)[None]))[0]), *want_hw)
        info = dict(prompt=prompt, seed=seed, height=want_hw[0], width=want_hw[1], generated_size=list(out_hw),
                    mode="segment" if segment else ("edit" if images else "t2i"), num_steps=int(o.num_steps),
                    text_guidance_scale=tg, image_guidance_scale=ig, cfg_range=list(o.cfg_range),
                    negative_prompt=str(o.negative_prompt) if tg > 1.0 else None, family="omnigen2",
                    variant=self.config.variant)
        return image, info


def tokenizer_for(config, workdir: str):
    """The tokenizer of an OmniGen2 run: ``config.data.tokenizer`` when it names a folder or file; else, for
    weights imported with ``--mode import`` (no training checkpoint in ``workdir``), the source folder's
    ``processor/`` then ``mllm/``; else ``get_tokenizer(config)`` (the synthetic one of the tiny config).
    Special ids are checked against ``config.model.tokens``, the vocabulary against the MLLM's."""
    import os

    from sgt_jax.checkpoint import store
    from sgt_jax.data.tokenizer import get_tokenizer, load_tokenizer
    from sgt_jax.sampling.loading import _has_training_checkpoints

    spec = str(config.data.tokenizer)
    if spec not in ("", "synthetic") or _has_training_checkpoints(workdir):
        return get_tokenizer(config)
    params = workdir if os.path.isdir(os.path.join(workdir, store.PARAMS_DIR)) else config.checkpoint.init_from
    if not params:
        return get_tokenizer(config)
    source = store.read_params_meta(params)["source"]["path"]
    tried = [os.path.join(source, sub) for sub in ("processor", "mllm")]
    for folder in tried:
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
            tok = load_tokenizer(folder, expected_ids=dict(config.model.tokens))
            vocab = int(config.model.mllm.text.vocab_size)
            if tok.vocab_size > vocab:
                raise ValueError(f"tokenizer {folder!r} has {tok.vocab_size} ids > the MLLM's vocabulary {vocab}")
            return tok
    raise FileNotFoundError(f"no tokenizer for the imported OmniGen2 weights in {params}: none in {' or '.join(tried)}"
                            " (the imported folder); set --config.data.tokenizer=<folder with tokenizer.json>")


def _encode_fn(static, state, x, key):
    return nnx.merge(static.graphdef, state).encode(x, key)


def _decode_fn(static, state, z):
    return nnx.merge(static.graphdef, state).decode_scaled(z)


_encode_jit = jax.jit(_encode_fn, static_argnums=(0,))
_decode_jit = jax.jit(_decode_fn, static_argnums=(0,))
