"""SGT-OmniGen2 configs: Qwen2.5-VL-3B (the MLLM) + OmniGen2's diffusion transformer + the FLUX VAE.

Variants (``--config configs/omnigen2_sgt.py:VARIANT``):
  3b    OmniGen2 with the paper's SGT recipe (song2yu/SGT `OmniGen2/options/sft_panoptic.yml`,
        `OmniGen2/train.py`): the whole Qwen2.5-VL (vision tower included) and the whole DiT train, the
        VAE is frozen; AdamW lr 5e-6, betas 0.9/0.95, weight decay 0.01, eps 1e-8, 300 linear warm-up
        steps then constant, clip 1.0, 5000 steps, no EMA, 60 samples per step at 2:1 seg:VQA.
  tiny  a tiny model of the same structure on the built-in synthetic shapes world (CPU, minutes).

``config.model.family = "omnigen2"`` selects the OmniGen2 model, plan, loss and checkpoint tables (BAGEL
configs say ``"bagel"``). Sections shared with BAGEL (data sources, quotas, train loop, checkpoint, mesh,
compile) come from configs/bagel_sgt.py and keep their meaning; docs/omnigen2.md "Training" explains the
fields below and what differs from the reference code.
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "_bagel_sgt_for_omnigen2", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bagel_sgt.py"))
_bagel_sgt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bagel_sgt)

VARIANTS = ("3b", "tiny")

# The chat template's system prompt of OmniGen2's training and SGT's samples (VectorSpaceLab/OmniGen2
# `omnigen2/dataset/omnigen2_train_dataset.py`; song2yu/SGT keeps it for both task kinds).
SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."


def _mllm(variant):
    """Qwen2.5-VL (sgt_jax/models/qwen2_5_vl.py config fields) + its image processor's pixel range."""
    cd = ml_collections.ConfigDict
    m = cd()
    if variant == "3b":
        m.text = cd(dict(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128,
                         intermediate_size=11008, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                         mrope_section=(16, 24, 24), tie_word_embeddings=True))
        m.vision = cd(dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=(7, 15, 23, 31), out_hidden_size=2048, in_channels=3,
                           rope_theta=10000.0))
        m.tokens = cd(dict(image=151655, vision_start=151652, vision_end=151653, eos=151645, pad=151643))
        # SGT's Qwen AutoProcessor range (song2yu/SGT `OmniGen2/omnigen2/dataset/omnigen2_train_dataset.py`)
        m.min_pixels, m.max_pixels = 256 * 28 * 28, 1280 * 28 * 28
        m.attention_impl, m.attention_chunk = "chunked", 512
    else:
        m.text = cd(dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                         intermediate_size=128, vocab_size=512, rope_theta=1e6, rms_norm_eps=1e-6,
                         mrope_section=(2, 3, 3), tie_word_embeddings=True))
        m.vision = cd(dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=(1,),
                           out_hidden_size=64, in_channels=3, rope_theta=10000.0))
        # The tiny word-level tokenizer (sgt_jax/data/tokenizer.py): specials at 0-4; the image pad id is
        # above its words (the plan writes it directly, the tokenizer never produces it).
        m.tokens = cd(dict(image=500, vision_start=3, vision_end=4, eos=2, pad=0))
        m.min_pixels, m.max_pixels = 28 * 28, 56 * 56
        m.attention_impl, m.attention_chunk = "dense", 64
    return m


def _model(variant):
    from sgt_jax.models import omnigen2_dit  # the released / tiny DiT configs live with the model

    big = variant == "3b"
    m = ml_collections.ConfigDict()
    m.family = "omnigen2"
    # Compute settings shared by the MLLM and the DiT (each sub-config refers to these fields).
    m.dtype = "bfloat16" if big else "float32"
    m.param_dtype = "float32"  # fp32 master weights (the reference runs AdamW on bf16 weights)
    m.scan_layers = True
    m.remat_policy = "full" if big else "none"
    m.mllm = _mllm(variant)
    m.dit = omnigen2_dit.released_config() if big else omnigen2_dit.tiny_config()
    if not big:
        m.dit.update(dict(in_channels=4, out_channels=4, axes_lens=(256, 256, 256)))  # text ids use all 3 axes
    m.dit.text_feat_dim = m.mllm.text.hidden_size  # the DiT reads the MLLM's last hidden states
    for sub in (m.mllm, m.dit):
        for k in ("dtype", "param_dtype", "scan_layers", "remat_policy"):
            sub[k] = m.get_ref(k)
    m.vae = ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16,
        num_groups=32, scale_factor=0.3611, shift_factor=0.1159))
    if not big:
        m.vae.update(dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, num_groups=8))
    # The tokenizer's special tokens by role (checked by name against the tokenizer, sgt_jax/data/tokenizer.py).
    m.tokens = ml_collections.ConfigDict(
        dict(bos=151644, eos=151645, vision_start=151652, vision_end=151653) if big else
        dict(bos=1, eos=2, vision_start=3, vision_end=4))
    # Flow matching (sgt_jax/train/omnigen2_loss.py): t rounded to this dtype before use, as the official
    # run does with bf16 latents; "float32" keeps the exact draw.
    m.time_dtype = "bfloat16"
    return m


def get_config(variant: str = "3b") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown omnigen2_sgt variant {variant!r}; choose one of {VARIANTS}")
    big = variant == "3b"
    c = _bagel_sgt.get_config("7b" if big else "tiny")
    c.variant = variant
    c.model = _model(variant)

    # ---- data (shared keys keep their BAGEL meaning: sources, quota, seed, workers, tokenizer) ----
    d = c.data
    d.text_cond_dropout = 0.0  # SGT never drops the prompt of a segmentation sample
    # Samples per step (global): 60 in the reference (2 per micro-batch x 30 accumulation steps), 2:1 seg:VQA.
    d.packs_per_batch = 60 if big else 3
    d.quota = ml_collections.ConfigDict(dict(mode="samples", seg=2, vqa=1))
    d.latents = "online"  # the frozen VAE encodes the target in the step (posterior sample)
    d.tokenizer = "synthetic" if not big else ""
    # OmniGen2's sample plan (sgt_jax/data/omnigen2_plan.py): one sample per batch row, static budgets.
    d.omnigen2 = ml_collections.ConfigDict(dict(
        system_prompt=SYSTEM_PROMPT,  # segmentation rows (the reference's, for both task kinds)
        vqa_system_prompt="You are a helpful assistant.",  # VQA rows: Qwen2.5-VL's own chat template
        # Per-sample budgets: prompt+answer tokens, Qwen vision patches (a multiple of 4; 3b: 1280*28^2
        # pixels = 5120 patches -> 1280 image tokens), CE labels. A sample over a budget is skipped and
        # counted (over_budget).
        text_tokens=2048 if big else 96,
        vit_patches=5120 if big else 16,
        ce_labels=1024 if big else 32,
        # The target: downscale only, <= target_max_pixels and <= target_max_side per side (the square
        # canvas the VAE encodes), sides floored to target_multiple (a multiple of VAE stride x DiT
        # patch: 16 for 3b, 4 for tiny). The reference allows sides up to 2048 at <= 1024^2 pixels; a
        # fixed 1024^2 canvas keeps shapes static (landscape targets get <= 1024 per side).
        target_max_pixels=1024 * 1024 if big else 32 * 32,
        target_max_side=1024 if big else 32,
        target_multiple=16 if big else 4,
    ))

    # ---- train / optim (song2yu/SGT `OmniGen2/options/sft_panoptic.yml`) ----
    t = c.train
    t.steps = 5000 if big else 20
    t.seed = 2233
    t.ema_decay = 0.0  # no EMA in the reference
    # Loss weights: loss = ce_weight * CE(mean over answer tokens) + mse_weight * flow MSE (global per-element
    # mean). Default = the reference's effective weighting: with GA 30 and micro-batches [gen, gen, sft]
    # each seg micro-batch adds ~1x its flow MSE, each VQA micro-batch (1/30)x its CE, so per step
    # 20 x MSE + (10/30) x CE: CE at 1/60 of the flow loss. Balanced alternative: ce_weight = mse_weight = 1.
    t.ce_weight = 1.0 / 60.0
    t.mse_weight = 1.0
    t.microbatches = 1
    t.ce_chunk = 1024 if big else 16
    t.freeze = ml_collections.ConfigDict(dict(mllm_vision=False, mllm_text=False, dit=False))
    t.peak_flops = 0.0
    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-6 if big else 1e-3, warmup_steps=300 if big else 2, schedule="constant", min_lr=0.0,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0, mu_dtype="float32"))
    c.checkpoint.every = 250 if big else 10
    # compile mode: keep data.packs_per_batch (samples per step) as set; the BAGEL attention live-block
    # fractions do not apply (OmniGen2's attention is not block-skipped)
    c.compile.packs_per_chip = 0
    c.compile.attention_live_fraction = 0.0
    c.compile.vit_live_fraction = 0.0
    c.mesh.max_replicated_fraction = 0.02 if big else 0.5
    # Logical rules: BAGEL's table plus the DiT's names. Qwen2.5-VL-3B has 2 KV heads and the DiT 7 KV /
    # 21 query heads: neither divides a tensor axis of 4 or 8, so the 3b recipe shards by fsdp only
    # (mesh.shape (1, -1, 1)); heads stay whole (docs/omnigen2.md).

    # ---- inference: OmniGen2's sampler (sgt_jax/sampling/omnigen2_inference.py, docs/omnigen2.md
    # "Inference"); defaults = the official inference.py (VectorSpaceLab/OmniGen2), except the negative
    # prompt ("" = the pipeline's own default; inference.py passes a long list of defects).
    c.generate.omnigen2 = ml_collections.ConfigDict(dict(
        num_steps=50 if big else 3,  # Euler steps = DiT evaluations per CFG pass
        text_guidance_scale=5.0,  # <= 1: no guidance at all
        image_guidance_scale=2.0,  # used with reference images (editing) and a text scale > 1
        cfg_range=(0.0, 1.0),  # guidance at step i iff lo <= i/num_steps <= hi
        negative_prompt="",
        max_pixels=1024 * 1024 if big else 32 * 32,  # output and reference images: at most this many pixels
        max_input_side=1024 if big else 64,  # reference images: longest side at most this
        align_res=True,  # one reference image: the output takes its (fitted) size
    ))
    c.generate.update(dict(height=1024 if big else 32, width=1024 if big else 32))  # text-to-image size
    return c
