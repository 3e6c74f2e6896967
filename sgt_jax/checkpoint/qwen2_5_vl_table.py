"""Qwen2.5-VL (OmniGen2's MLLM) weights <-> our parameters: the key table as data, and the folder entry points.

Two PyTorch key layouts exist (transformers ``Qwen2_5_VLForConditionalGeneration``):

| part | ``legacy`` | ``current`` |
|---|---|---|
| decoder | ``model.embed_tokens``, ``model.layers.{i}.*``, ``model.norm`` | ``model.language_model.*`` |
| vision | ``visual.*`` | ``model.visual.*`` |
| head | ``lm_head.weight`` (absent when tied) | ``lm_head.weight`` (absent when tied) |

``legacy`` is what ``save_pretrained`` writes (checked with transformers 5.24, which maps its module tree
back on save): the released Qwen2.5-VL-3B-Instruct and OmniGen2's ``mllm/``. ``current`` is the module
tree of transformers >= 4.52, i.e. what ``model.state_dict()`` holds (a raw training checkpoint).
The layout is detected from the tensor names and recorded, so export writes the keys the source had.
Rows are ``table.Entry`` (reshape + transpose + stack): the same rows serve the in-memory converters,
the sliced streaming import (``streaming.fill_from_table``) and the streamed export.

Our side (sgt_jax/models/qwen2_5_vl.py): Linear ``(out, in)`` -> kernel ``(in, out)`` with head axes kept
explicit (q/k/v ``(embed, heads, head_dim)``, o_proj ``(heads, head_dim, embed)``, the vision qkv
``(hidden, 3, heads, head_dim)``, the vision proj ``(heads, head_dim, hidden)``), the Conv3d patch
embedding ``(hidden, C, T, ps, ps)`` -> ``(C, T, ps, ps, hidden)``, RMSNorm ``weight`` -> ``scale``,
``merger.mlp.0/2`` -> ``merger.mlp_0/2``.

A tied LM head (3B) is not a parameter: import ignores ``lm_head.weight`` when present (its shape is
checked), export writes it again (the embedding) only if the source folder had it.
"""

from __future__ import annotations

import re

import numpy as np

from sgt_jax.checkpoint.llm_tables import _linear, _vector
from sgt_jax.checkpoint.table import ConversionError, Entry, check_keys, expected_shapes, state_dict_to_tree, \
    tree_to_state_dict

LAYOUTS = {"legacy": ("model.", "visual."), "current": ("model.language_model.", "model.visual.")}
LM_HEAD = "lm_head.weight"


def text_table(t, prefix: str) -> list[Entry]:
    h, nq, nkv, hd, inter, vocab, n = (t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim,
                                       t.intermediate_size, t.vocab_size, t.num_layers)
    p = ("language_model",)
    rows = [Entry(p + ("embed_tokens", "embedding"), prefix + "embed_tokens.weight", (vocab, h)),
            *_vector(p + ("norm", "scale"), prefix + "norm.weight", h)]
    if not t.tie_word_embeddings:
        rows.append(Entry(p + ("lm_head", "kernel"), LM_HEAD, (vocab, h), None, (1, 0)))
    lay, pl = prefix + "layers.{i}.", p + ("layers",)
    rows += _vector(pl + ("input_norm", "scale"), lay + "input_layernorm.weight", h, n)
    rows += _vector(pl + ("post_norm", "scale"), lay + "post_attention_layernorm.weight", h, n)
    rows += _linear(pl + ("q_proj",), lay + "self_attn.q_proj", nq * hd, h, out_split=(nq, hd), layers=n)
    rows += _linear(pl + ("k_proj",), lay + "self_attn.k_proj", nkv * hd, h, out_split=(nkv, hd), layers=n)
    rows += _linear(pl + ("v_proj",), lay + "self_attn.v_proj", nkv * hd, h, out_split=(nkv, hd), layers=n)
    rows += _linear(pl + ("o_proj",), lay + "self_attn.o_proj", h, nq * hd, in_split=(nq, hd), bias=False, layers=n)
    for proj, o, i in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
        rows += _linear(pl + ("mlp", proj), lay + f"mlp.{proj}", o, i, bias=False, layers=n)
    return rows


def vision_table(v, prefix: str) -> list[Entry]:
    dv, nh, inter, n, unit = v.hidden_size, v.num_heads, v.intermediate_size, v.depth, v.spatial_merge_size ** 2
    hd = dv // nh
    c, tp, ps = v.in_channels, v.temporal_patch_size, v.patch_size
    p = ("visual",)
    rows = [Entry(p + ("patch_embed", "kernel"), prefix + "patch_embed.proj.weight", (dv, c, tp, ps, ps),
                  None, (1, 2, 3, 4, 0)),
            *_vector(p + ("merger", "ln_q", "scale"), prefix + "merger.ln_q.weight", dv),
            *_linear(p + ("merger", "mlp_0"), prefix + "merger.mlp.0", unit * dv, unit * dv),
            *_linear(p + ("merger", "mlp_2"), prefix + "merger.mlp.2", v.out_hidden_size, unit * dv)]
    lay, pb = prefix + "blocks.{i}.", p + ("blocks",)
    rows += _vector(pb + ("norm1", "scale"), lay + "norm1.weight", dv, n)
    rows += _vector(pb + ("norm2", "scale"), lay + "norm2.weight", dv, n)
    rows += _linear(pb + ("qkv",), lay + "attn.qkv", 3 * dv, dv, out_split=(3, nh, hd), layers=n)
    rows += _linear(pb + ("proj",), lay + "attn.proj", dv, dv, in_split=(nh, hd), layers=n)
    for proj, o, i in (("gate_proj", inter, dv), ("up_proj", inter, dv), ("down_proj", dv, inter)):
        rows += _linear(pb + (proj,), lay + f"mlp.{proj}", o, i, layers=n)
    return rows


def qwen2_5_vl_table(cfg, layout: str = "legacy") -> list[Entry]:
    """Every parameter row of ``Qwen2_5_VL(cfg)`` for the key ``layout`` ("legacy" or "current")."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Qwen2.5-VL key layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    text_prefix, vision_prefix = LAYOUTS[layout]
    return text_table(cfg.text, text_prefix) + vision_table(cfg.vision, vision_prefix)


def detect_layout(keys) -> str:
    """'current' if any key starts with ``model.language_model.`` / ``model.visual.``, 'legacy' if the keys
    are ``model.layers.*`` / ``visual.*``; anything else is an error naming a few keys."""
    keys = list(keys)
    if any(k.startswith(("model.language_model.", "model.visual.")) for k in keys):
        return "current"
    if any(re.match(r"model\.(layers|embed_tokens)\.", k) or k.startswith("visual.") for k in keys):
        return "legacy"
    raise ValueError("neither legacy (model.layers.*, visual.*) nor current (model.language_model.*, "
                     f"model.visual.*) Qwen2.5-VL keys; first keys: {sorted(keys)[:5]}")


def expected_keys(cfg, layout: str, *, with_lm_head: bool) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a folder in ``layout``; a tied head's ``lm_head.weight`` when ``with_lm_head``."""
    out = expected_shapes(qwen2_5_vl_table(cfg, layout))
    if cfg.text.tie_word_embeddings and with_lm_head:
        out[LM_HEAD] = (cfg.text.vocab_size, cfg.text.hidden_size)
    return out


def state_dict_to_params(state_dict, cfg, *, dtype=np.float32) -> dict:
    """A Qwen2.5-VL state dict (either layout, numpy arrays) -> nested param dict of ``Qwen2_5_VL(cfg)``.
    Raises ``ConversionError`` naming every missing, unexpected or mis-shaped key."""
    layout = detect_layout(state_dict)
    actual = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    problems = check_keys(expected_keys(cfg, layout, with_lm_head=LM_HEAD in actual), actual, "state dict")
    if problems:
        raise ConversionError(problems)
    return state_dict_to_tree(qwen2_5_vl_table(cfg, layout), state_dict, dtype=dtype, ignore=(LM_HEAD,))


def params_to_state_dict(params, cfg, *, layout: str = "legacy", with_lm_head: bool = False,
                         dtype=None) -> dict[str, np.ndarray]:
    """Inverse of ``state_dict_to_params``; a tied head is written as ``lm_head.weight`` only if asked."""
    out = tree_to_state_dict(qwen2_5_vl_table(cfg, layout), params, dtype=dtype)
    if cfg.text.tie_word_embeddings and with_lm_head:
        out[LM_HEAD] = out[LAYOUTS[layout][0] + "embed_tokens.weight"].copy()
    return out
