"""Sequence plans: one decoded sample -> its tokens, ViT patches, latent rows and CE labels, in ORIGINAL order.

A plan is the sample's own document, exactly as BAGEL's ``pack_sequence`` would lay it out at the start of a
pack (ByteDance-Seed/Bagel `data/dataset_base.py` `pack_sequence`); the packer (sgt_jax/data/packing.py) only offsets ids and moves tokens to
their expert's half of the pack. Plans are plain dicts of numpy arrays (cheap to pickle across Grain
workers). Keys:

| key | shape | meaning |
|---|---|---|
| ``tokens, kind, split, mode, rope`` | int32 [n] | as in docs/interfaces.md §1, local to the sample (split from 0) |
| ``ce_pos, ce_label`` | int32 [l] | CE at local token index ``ce_pos`` predicts ``ce_label`` |
| ``vit_patches`` | uint8 [p, ps·ps·3] | un-normalised pixels; the i-th kind-2 token is row i |
| ``vit_pos, vit_image`` | int32 [p] | ``row*max_patches_per_side + col``; local image id |
| ``latent_pos, latent_image`` | int32 [z] | ``r*max_latent_size + c``; local VAE slot; the i-th kind-3 token is row i |
| ``latent_target`` | bool [z] | noisy generation target (MSE) vs clean condition |
| ``latent_rc`` | int32 [z, 2] | (row, col) of the token in its image's latent grid |
| ``vae_images`` | list of uint8 [h, w, 3] | the VAE images (resized), one per slot |
| ``group, task, key, source`` | str | ``group`` is "seg" (any segmentation-family task) or "vqa" |
| ``n_und, n_gen, n_vit, n_ce, n_vae`` | int | what the sample needs of each pack budget |

Plans (song2yu/SGT `BAGEL/data/sam_190k.py` for SGT, BAGEL's vlm and t2i datasets for the others):
- SGT: [ViT view of the image (full, RoPE 0), instruction (causal, no CE; dropped with p=text_cond_dropout
  WITHOUT advancing RoPE), noisy VAE target (noise, MSE, RoPE not advanced)].
- VQA: BAGEL's vlm_dataset: human turns split at ``<image>`` into text pieces (stripped, no loss) and ViT
  images (VLM transform, max_pixels shared by the sample's images); gpt turns are text with CE: inputs
  ``<|im_start|>`` + answer, labels answer + ``<|im_end|>`` (so the model learns to stop). Every text split
  ends with an ``<|im_end|>`` input token with no label. No roles, no system prompt.
- T2I: [prompt (causal, no CE; dropped with p=text_cond_dropout WITHOUT advancing RoPE), noisy VAE image
  (noise, MSE)]: the SGT plan without the ViT view (used to pre-train the base model of bench/toy_sgt.py).
"""

from __future__ import annotations

import numpy as np

from sgt_jax.data import records
from sgt_jax.data.records import BadSample
from sgt_jax.data.transforms import Transforms, latent_grid, patchify, resize

KIND_PAD, KIND_TEXT, KIND_VIT, KIND_LATENT = 0, 1, 2, 3
MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2
# Segmentation-family targets that are label/colour maps (resized nearest); the others are photos (bicubic).
NEAREST_TARGETS = ("seg", "edge")


class _PlanBuilder:
    """Appends BAGEL plan items to one sample's document, tracking split ids and the RoPE counter."""

    def __init__(self, tok, tfm: Transforms):
        self.tok, self.tfm = tok, tfm
        self.tokens, self.kind, self.split, self.mode, self.rope = [], [], [], [], []
        self.ce_pos, self.ce_label = [], []
        self.vit_patches, self.vit_pos, self.vit_image = [], [], []
        self.latent_pos, self.latent_image, self.latent_target, self.latent_rc = [], [], [], []
        self.vae_images: list[np.ndarray] = []
        self.n_splits = 0
        self.n_vit_images = 0
        self.curr_rope = 0

    def _emit(self, tokens, kind, mode, rope):
        n = len(kind)
        self.tokens.extend(tokens)
        self.kind.extend(kind)
        self.split.extend([self.n_splits] * n)
        self.mode.extend([mode] * n)
        self.rope.extend(rope)
        self.n_splits += 1

    def text(self, ids: list[int], loss: bool) -> None:
        """[<|im_start|>] + ids + [<|im_end|>], causal, RoPE rope..rope+len-1; CE labels ids + [<|im_end|>]."""
        tok = self.tok
        seq = [tok.bos] + list(ids) + [tok.eos]
        if loss:
            start = len(self.tokens)
            self.ce_pos.extend(range(start, start + len(ids) + 1))
            self.ce_label.extend(list(ids) + [tok.eos])
        self._emit(seq, [KIND_TEXT] * len(seq), MODE_CAUSAL, range(self.curr_rope, self.curr_rope + len(seq)))
        self.curr_rope += len(seq)

    def vit(self, image: np.ndarray) -> None:
        """[<|vision_start|>] + ViT tokens + [<|vision_end|>], full, one shared RoPE id, then RoPE += 1."""
        patches, pos = patchify(image, self.tfm.patch_size, self.tfm.max_patches_per_side)
        n = patches.shape[0]
        self.vit_patches.append(patches)
        self.vit_pos.append(pos)
        self.vit_image.append(np.full((n,), self.n_vit_images, np.int32))
        self.n_vit_images += 1
        seq = [self.tok.vision_start] + [0] * n + [self.tok.vision_end]
        kind = [KIND_TEXT] + [KIND_VIT] * n + [KIND_TEXT]
        self._emit(seq, kind, MODE_FULL, [self.curr_rope] * (n + 2))
        self.curr_rope += 1

    def vae(self, image: np.ndarray, target: bool) -> None:
        """[<|vision_start|>] + h·w latent tokens + [<|vision_end|>]; noise (target) or full (clean condition).

        One shared RoPE id; a noisy target does not advance RoPE, a clean condition advances it by 1.
        """
        gh, gw = latent_grid(image.shape[0], image.shape[1], self.tfm.latent_stride)
        if max(gh, gw) > self.tfm.max_latent_size:
            raise BadSample("over_budget", f"VAE image {image.shape[:2]} exceeds max_latent_size {self.tfm.max_latent_size}")
        r, c = np.meshgrid(np.arange(gh, dtype=np.int32), np.arange(gw, dtype=np.int32), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        n = gh * gw
        self.latent_pos.append(r * self.tfm.max_latent_size + c)
        self.latent_image.append(np.full((n,), len(self.vae_images), np.int32))
        self.latent_target.append(np.full((n,), bool(target)))
        self.latent_rc.append(np.stack([r, c], axis=1))
        self.vae_images.append(image)
        seq = [self.tok.vision_start] + [0] * n + [self.tok.vision_end]
        kind = [KIND_TEXT] + [KIND_LATENT] * n + [KIND_TEXT]
        self._emit(seq, kind, MODE_NOISE if target else MODE_FULL, [self.curr_rope] * (n + 2))
        if not target:
            self.curr_rope += 1

    def finish(self, sample: dict, group: str) -> dict:
        ps2c = self.tfm.patch_size ** 2 * 3

        def cat(xs, dtype, tail=()):
            return np.concatenate(xs).astype(dtype) if xs else np.zeros((0,) + tail, dtype)

        kind = np.asarray(self.kind, np.int32)
        plan = {
            "tokens": np.asarray(self.tokens, np.int32), "kind": kind,
            "split": np.asarray(self.split, np.int32), "mode": np.asarray(self.mode, np.int32),
            "rope": np.asarray(self.rope, np.int32),
            "ce_pos": np.asarray(self.ce_pos, np.int32), "ce_label": np.asarray(self.ce_label, np.int32),
            "vit_patches": cat(self.vit_patches, np.uint8, (ps2c,)), "vit_pos": cat(self.vit_pos, np.int32),
            "vit_image": cat(self.vit_image, np.int32),
            "latent_pos": cat(self.latent_pos, np.int32), "latent_image": cat(self.latent_image, np.int32),
            "latent_target": cat(self.latent_target, bool), "latent_rc": cat(self.latent_rc, np.int32, (2,)),
            "vae_images": self.vae_images,
            "group": group, "task": sample["task"], "key": sample["key"], "source": sample["source"],
        }
        plan["n_gen"] = int((kind == KIND_LATENT).sum())
        plan["n_und"] = int(kind.size - plan["n_gen"])
        plan["n_vit"] = int(plan["vit_pos"].size)
        plan["n_ce"] = int(plan["ce_pos"].size)
        plan["n_vae"] = len(self.vae_images)
        return plan


def sgt_plan(sample: dict, instruction: str, tok, tfm: Transforms, *, drop_text: bool) -> dict:
    """The SGT plan of a segmentation-family sample (records.py); ``drop_text``: the CFG dropout draw."""
    task, key = sample["task"], sample["key"]
    if task not in records.SEG_TASKS:
        raise BadSample("bad_record", f"{key}: sgt_plan needs a segmentation-family task, got {task!r}")
    image = sample["image"]
    h, w = image.shape[:2]
    b = _PlanBuilder(tok, tfm)
    vw, vh = tfm.sgt_vit.output_size(w, h)
    b.vit(resize(image, vw, vh))
    if not drop_text:  # a dropped text split is skipped without advancing RoPE (ByteDance-Seed/Bagel `data/dataset_base.py`)
        b.text(tok.encode(instruction, where=f"{key} instruction"), loss=False)
    b.vae(vae_target(sample, tfm), target=True)
    return b.finish(sample, "seg")


def t2i_plan(prompt: str, image: np.ndarray, key: str, source: str, tok, tfm: Transforms, *,
             drop_text: bool) -> dict:
    """The text-to-image plan: ``prompt`` then the noisy VAE latents of ``image`` (uint8 [H, W, 3], resized
    with the VAE transform); ``drop_text``: the CFG dropout draw. ``group`` is "seg" (the generation stream)
    and ``task`` "t2i"."""
    h, w = image.shape[:2]
    gw, gh = tfm.vae.output_size(w, h)
    b = _PlanBuilder(tok, tfm)
    if not drop_text:
        b.text(tok.encode(prompt, where=f"{key} prompt"), loss=False)
    b.vae(resize(image, gw, gh), target=True)
    return b.finish({"task": "t2i", "key": key, "source": source}, "seg")


def vae_target(sample: dict, tfm: Transforms) -> np.ndarray:
    """The VAE target image (uint8, VAE-transform size) of a segmentation-family sample. The latent cache
    encodes exactly this image, so cached and online latents describe the same pixels."""
    h, w = sample["image"].shape[:2]
    gw, gh = tfm.vae.output_size(w, h)
    return resize(sample["target"], gw, gh, nearest=sample["task"] in NEAREST_TARGETS)


def _vqa_elements(turns: list[dict]) -> list[tuple[str, str | None, bool]]:
    """BAGEL vlm_dataset ``change_format``: [(kind "text"|"image", text, has_loss)] in conversation order."""
    out = []
    for turn in turns:
        value = turn["value"]
        if turn["from"] == "gpt":
            out.append(("text", value, True))
        elif records.IMAGE_MARKER not in value:
            out.append(("text", value, False))
        else:
            pieces = value.split(records.IMAGE_MARKER)
            for i, piece in enumerate(pieces):
                if piece.strip():
                    out.append(("text", piece.strip(), False))
                if i != len(pieces) - 1:
                    out.append(("image", None, False))
    return out


def vqa_plan(sample: dict, tok, tfm: Transforms) -> dict:
    """The VQA plan (BAGEL vlm_dataset): alternating text splits and ViT images, CE on gpt turns."""
    key, images = sample["key"], sample["images"]
    elements = _vqa_elements(sample["turns"])
    n_markers = sum(1 for e in elements if e[0] == "image")
    if n_markers != len(images):
        raise BadSample("image_count_mismatch", f"{key}: {n_markers} <image> markers, {len(images)} images")
    b = _PlanBuilder(tok, tfm)
    img_iter = iter(images)
    for i, (kind, text, loss) in enumerate(elements):
        if kind == "image":
            img = next(img_iter)
            w, h = tfm.vlm_vit.output_size(img.shape[1], img.shape[0], img_num=len(images))
            b.vit(resize(img, w, h))
            continue
        ids = tok.encode(text, where=f"{key} turn element {i}")
        if ids:  # BAGEL drops text elements that tokenise to nothing
            b.text(ids, loss=loss)
    if not b.ce_pos:
        raise BadSample("empty_conversation", f"{key}: no gpt turn with tokens (nothing to learn)")
    return b.finish(sample, "vqa")


def check_budget(plan: dict, budget) -> dict:
    """Raises BadSample("over_budget") if ``plan`` cannot fit an EMPTY pack of ``budget`` (PackBudget)."""
    over = [f"{name} {plan[k]} > {lim}" for name, k, lim in (
        ("und tokens", "n_und", budget.und_tokens), ("gen tokens", "n_gen", budget.gen_tokens),
        ("ViT patches", "n_vit", budget.vit_patches), ("CE labels", "n_ce", budget.ce_labels),
        ("VAE images", "n_vae", budget.vae_images)) if plan[k] > lim]
    if over:
        raise BadSample("over_budget", f"{plan['key']}: " + ", ".join(over))
    return plan
