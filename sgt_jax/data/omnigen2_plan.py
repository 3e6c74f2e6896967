"""OmniGen2 sample plans: one decoded sample (sgt_jax/data/records.py) -> one padded batch row.

OmniGen2 is not packed: every sample is its own row with static budgets (``config.data.omnigen2``), as the
reference trains it (song2yu/SGT ``OmniGen2/train.py``: one task per micro-batch, right-padded prompts).

Segmentation family (song2yu/SGT ``OmniGen2/omnigen2/dataset/omnigen2_train_dataset.py`` ``process_sam``)::

    <|im_start|>system\\n{system_prompt}<|im_end|>\\n<|im_start|>user\\n<img1>: <|vision_start|>
    <|image_pad|> x n <|vision_end|>{instruction}<|im_end|>\\n<|im_start|>assistant\\n

The RGB image goes through the Qwen2.5-VL processing rule (``qwen_vl_image.preprocess``: min/max pixels)
into the MLLM only; the target (the mask) is resized down only, to <= ``target_max_pixels`` and
<= ``target_max_side`` per side, each side floored to ``target_multiple``. Label/colour-map targets
(seg, edge) are resized nearest-neighbour (the reference uses Lanczos, which blends instance colours at
borders: a defect this project does not copy); photo targets (recon, inpaint) use Lanczos as the
reference does. The prompt is never dropped (SGT's SAM samples never drop it).

VQA (the reference keeps only the last turn, labels no end-of-turn token and uses the image-generation
system prompt: defects not copied): Qwen2.5-VL's own chat template over every turn, with
``vqa_system_prompt``; ``<image>`` markers become ``<|vision_start|><|image_pad|> x n<|vision_end|>``;
CE labels are every assistant answer plus its ``<|im_end|>`` (so the model learns to stop).

Row keys (numpy, static shapes; T text tokens, P vision patches, L CE labels, S target canvas side)::

    tokens [T] int32 (pad: the tokenizer's pad), doc [T] int32 (0 valid, -1 pad), mrope [3, T] int32,
    vision_index [T] int32 (the row's merged vision token replacing the embedding, -1 text),
    vit_patches [P, D] float32 (normalised), vit_image / vit_window [P] int32 (-1 pad), vit_hw [P, 2],
    ce_pos / ce_label [L] int32, ce_valid [L] bool,
    target_images [S, S, 3] float32 in [-1, 1] (zero padded; VQA rows all 0), target_hw [2] int32 (the
    target's DiT token grid; (0, 0) for VQA), n_seg / n_vqa int32 (1 for the row's task).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from sgt_jax.data import qwen_vl_image, records
from sgt_jax.data import qwen_vl_plan as qplan
from sgt_jax.data.records import BadSample

NEAREST_TARGETS = ("seg", "edge")
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2.5-VL's default chat-template system prompt


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Everything a plan needs, read once from the run config (picklable for Grain workers)."""

    system_prompt: str
    vqa_system_prompt: str
    text_tokens: int
    vit_patches: int
    ce_labels: int
    target_max_pixels: int
    target_max_side: int
    target_multiple: int
    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge: int
    window_size: int
    image_token: int
    pad_token: int
    latent_stride: int  # VAE stride x DiT patch: target pixels per DiT token side

    @classmethod
    def from_config(cls, config) -> "PlanConfig":
        d, m = config.data.omnigen2, config.model
        v = m.mllm.vision
        stride = 2 ** (len(m.vae.ch_mult) - 1) * int(m.dit.patch_size)
        out = cls(str(d.system_prompt), str(d.vqa_system_prompt), int(d.text_tokens), int(d.vit_patches),
                  int(d.ce_labels), int(d.target_max_pixels), int(d.target_max_side), int(d.target_multiple),
                  int(m.mllm.min_pixels), int(m.mllm.max_pixels), int(v.patch_size), int(v.temporal_patch_size),
                  int(v.spatial_merge_size), int(v.window_size), int(m.mllm.tokens.image), int(m.mllm.tokens.pad),
                  stride)
        vocab = int(m.mllm.text.vocab_size)
        bad = {k: int(v) for k, v in m.mllm.tokens.items() if not 0 <= int(v) < vocab}
        if bad:
            raise ValueError(f"config.model.mllm.tokens {bad} lie outside the vocabulary of {vocab} "
                             "(config.model.mllm.text.vocab_size)")
        if out.target_multiple % stride or out.target_max_side % out.target_multiple:
            raise ValueError(f"config.data.omnigen2.target_multiple={out.target_multiple} must be a multiple of the "
                             f"VAE stride x DiT patch ({stride}) and divide target_max_side={out.target_max_side}")
        if out.vit_patches % (out.merge * out.merge):
            raise ValueError(f"config.data.omnigen2.vit_patches={out.vit_patches} must be a multiple of "
                             f"{out.merge * out.merge} (spatial_merge_size²)")
        return out

    @property
    def target_tokens(self) -> int:
        return (self.target_max_side // self.latent_stride) ** 2


def target_size(h: int, w: int, pc: PlanConfig) -> tuple[int, int]:
    """OmniGen2's output-size rule (downscale only): pixels <= max, sides <= max_side, floored to the multiple."""
    scale = min(1.0, math.sqrt(pc.target_max_pixels / (h * w)), pc.target_max_side / h, pc.target_max_side / w)
    m = pc.target_multiple
    th, tw = int(h * scale) // m * m, int(w * scale) // m * m
    if th < m or tw < m:
        raise BadSample("bad_record", f"target {h}x{w} is smaller than one {m}x{m} block after resizing")
    return th, tw


def target_image(target: np.ndarray, task: str, pc: PlanConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [h, w, 3] in [-1, 1] at ``target_size`` (nearest for label maps)."""
    th, tw = target_size(target.shape[0], target.shape[1], pc)
    pil = Image.fromarray(np.asarray(target, np.uint8)).convert("RGB")
    if (th, tw) != target.shape[:2]:
        method = Image.Resampling.NEAREST if task in NEAREST_TARGETS else Image.Resampling.LANCZOS
        pil = pil.resize((tw, th), resample=method)
    return np.asarray(pil, np.float32) / 127.5 - 1.0


class _Row:
    """Accumulates the token stream of one sample (special ids written directly, text through the tokenizer)."""

    def __init__(self, tok, pc: PlanConfig, key: str):
        self.tok, self.pc, self.key = tok, pc, key
        self.ids: list[int] = []
        self.label: list[bool] = []  # True: this token is a CE target (predicted from the previous one)
        self.images: list[np.ndarray] = []

    def special(self, *ids: int, loss: bool = False) -> None:
        self.ids.extend(int(i) for i in ids)
        self.label.extend([loss] * len(ids))

    def system_turn(self, prompt: str) -> None:
        """``<|im_start|>system\n{prompt}<|im_end|>\n`` (the chat template's first turn)."""
        self.special(self.tok.bos)
        self.text("system\n" + prompt, where="system prompt")
        self.special(self.tok.eos)
        self.text("\n")

    def text(self, s: str, loss: bool = False, where: str = "") -> None:
        ids = self.tok.encode(s, where=f"{self.key} {where}".strip())
        self.special(*ids, loss=loss)

    def image(self, image: np.ndarray) -> None:
        pv, grid = qwen_vl_image.preprocess(image, min_pixels=self.pc.min_pixels, max_pixels=self.pc.max_pixels,
                                            patch_size=self.pc.patch_size, merge_size=self.pc.merge,
                                            temporal_patch_size=self.pc.temporal_patch_size)
        self.images.append((pv, grid))
        n = int(np.prod(grid)) // (self.pc.merge * self.pc.merge)
        self.special(self.tok.vision_start)
        self.special(*([self.pc.image_token] * n))
        self.special(self.tok.vision_end)

    def finish(self, group: str) -> dict:
        pc, t, p, n_ce = self.pc, self.pc.text_tokens, self.pc.vit_patches, self.pc.ce_labels
        n = len(self.ids)
        n_patch = sum(int(np.prod(g)) for _, g in self.images)
        ce = [i - 1 for i in range(1, n) if self.label[i]]
        over = [f"{what} {have} > {lim}" for what, have, lim in (
            ("text tokens", n, t), ("vision patches", n_patch, p), ("CE labels", len(ce), n_ce)) if have > lim]
        if over:
            raise BadSample("over_budget", f"{self.key}: " + ", ".join(over))
        if group == "vqa" and not ce:
            raise BadSample("empty_conversation", f"{self.key}: no answer tokens (nothing to learn)")
        tokens = np.full(t, pc.pad_token, np.int32)
        tokens[:n] = self.ids
        valid = np.arange(t) < n
        row = dict(tokens=tokens, doc=np.where(valid, 0, -1).astype(np.int32))
        grids = np.asarray([g for _, g in self.images], np.int64).reshape(-1, 3)
        mrope, _ = qplan.mrope_positions(tokens[None], grids, image_token_id=pc.image_token,
                                         spatial_merge_size=pc.merge, valid=valid[None])
        row["mrope"] = mrope[:, 0]
        row.update(self._vision(tokens, valid, grids))
        ce_pos, ce_label = np.zeros(n_ce, np.int32), np.zeros(n_ce, np.int32)
        ce_pos[:len(ce)] = ce
        ce_label[:len(ce)] = [self.ids[i + 1] for i in ce]
        row.update(ce_pos=ce_pos, ce_label=ce_label, ce_valid=np.arange(n_ce) < len(ce))
        return row

    def _vision(self, tokens, valid, grids) -> dict:
        pc, p = self.pc, self.pc.vit_patches
        d = 3 * pc.temporal_patch_size * pc.patch_size ** 2
        if not self.images:
            return dict(vision_index=np.full(tokens.shape, -1, np.int32), vit_patches=np.zeros((p, d), np.float32),
                        vit_image=np.full(p, -1, np.int32), vit_window=np.full(p, -1, np.int32),
                        vit_hw=np.zeros((p, 2), np.int32))
        pack = qplan.vision_pack(grids, patch_size=pc.patch_size, spatial_merge_size=pc.merge,
                                 window_size=pc.window_size, max_patches=p)
        pixels = np.concatenate([pv for pv, _ in self.images], axis=0)
        index = qplan.vision_token_index(tokens[None], pack["merged_index"], image_token_id=pc.image_token,
                                         valid=valid[None])[0]
        return dict(vision_index=index, vit_patches=qplan.gather_patches(pixels, pack["source"]),
                    vit_image=pack["image_id"], vit_window=pack["window_id"], vit_hw=pack["pos_hw"])


def padding_row(pc: PlanConfig) -> dict:
    """A row of zeros with every key, shape and dtype of a real row (compile mode's abstract batch)."""
    t, p, n_ce, s = pc.text_tokens, pc.vit_patches, pc.ce_labels, pc.target_max_side
    d = 3 * pc.temporal_patch_size * pc.patch_size ** 2
    i32 = np.int32
    return dict(tokens=np.zeros(t, i32), doc=np.zeros(t, i32), mrope=np.zeros((3, t), i32),
                vision_index=np.zeros(t, i32), vit_patches=np.zeros((p, d), np.float32),
                vit_image=np.zeros(p, i32), vit_window=np.zeros(p, i32), vit_hw=np.zeros((p, 2), i32),
                ce_pos=np.zeros(n_ce, i32), ce_label=np.zeros(n_ce, i32), ce_valid=np.zeros(n_ce, bool),
                target_images=np.zeros((s, s, 3), np.float32), target_hw=np.zeros(2, i32),
                n_seg=np.int32(0), n_vqa=np.int32(0))


def _target_fields(pc: PlanConfig, image: np.ndarray | None) -> dict:
    s = pc.target_max_side
    canvas = np.zeros((s, s, 3), np.float32)
    hw = np.zeros(2, np.int32)
    if image is not None:
        canvas[: image.shape[0], : image.shape[1]] = image
        hw[:] = (image.shape[0] // pc.latent_stride, image.shape[1] // pc.latent_stride)
    return dict(target_images=canvas, target_hw=hw)


def seg_plan(sample: dict, instruction: str, tok, pc: PlanConfig) -> dict:
    """The SGT segmentation row: image + instruction to the MLLM, the target to the DiT."""
    task, key = sample["task"], sample["key"]
    if task not in records.SEG_TASKS:
        raise BadSample("bad_record", f"{key}: seg_plan needs a segmentation-family task, got {task!r}")
    r = _Row(tok, pc, key)
    r.system_turn(pc.system_prompt)
    r.special(tok.bos)
    r.text("user\n<img1>: ")
    r.image(sample["image"])
    r.text(instruction, where="instruction")
    r.special(tok.eos)
    r.text("\n")
    r.special(tok.bos)
    r.text("assistant\n")
    row = r.finish("seg")
    row.update(_target_fields(pc, target_image(sample["target"], task, pc)))
    row.update(n_seg=np.int32(1), n_vqa=np.int32(0))
    return row


def vqa_plan(sample: dict, tok, pc: PlanConfig) -> dict:
    """The VQA row: Qwen2.5-VL's chat template over every turn, CE on answers + ``<|im_end|>``."""
    key, images, turns = sample["key"], list(sample["images"]), sample["turns"]
    n_markers = sum(t["value"].count(records.IMAGE_MARKER) for t in turns if t["from"] == "human")
    if n_markers != len(images):
        raise BadSample("image_count_mismatch", f"{key}: {n_markers} <image> markers, {len(images)} images")
    r = _Row(tok, pc, key)
    r.system_turn(pc.vqa_system_prompt)
    it = iter(images)
    for i, turn in enumerate(turns):
        r.special(tok.bos)
        if turn["from"] == "gpt":
            r.text("assistant\n")
            r.text(turn["value"], loss=True, where=f"turn {i}")
            r.special(tok.eos, loss=True)
        else:
            r.text("user\n")
            pieces = turn["value"].split(records.IMAGE_MARKER)
            for j, piece in enumerate(pieces):
                if piece:
                    r.text(piece, where=f"turn {i}")
                if j != len(pieces) - 1:
                    r.image(next(it))
            r.special(tok.eos)
        r.text("\n")
    row = r.finish("vqa")
    row.update(_target_fields(pc, None))
    row.update(n_seg=np.int32(0), n_vqa=np.int32(1))
    return row
