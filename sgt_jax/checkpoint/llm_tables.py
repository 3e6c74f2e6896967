"""BAGEL key table for the LLM (both MoT experts) and the BAGEL heads, as data (see table.py).

Our side (sgt_jax/models): ``Bagel.llm`` (Qwen2MoT: ``embed_tokens.embedding``, stacked
``layers.{und,gen}.*`` with a leading ``layers`` axis, ``norm``, ``norm_gen``, ``lm_head``), then
``connector.fc{1,2}``, ``time_embedder.mlp_{0,2}``, ``vae2llm``, ``llm2vae``. Dense kernels are
``(in, out)`` with head axes kept explicit: q/k/v kernels ``(embed, heads, head_dim)``, biases
``(heads, head_dim)``, o_proj kernel ``(heads, head_dim, embed)``.

PyTorch side (the `ema.safetensors` of `ByteDance-Seed/BAGEL-7B-MoT`): Linear weights ``(out, in)`` with the head-major out dim
(heads × head_dim). The gen expert's suffix ``_moe_gen`` sits on the *projection* for attention
(``self_attn.q_proj_moe_gen.weight``, ``self_attn.q_norm_moe_gen.weight``), on the *module* for the MLP
(``mlp_moe_gen.gate_proj.weight``) and on the norm name for the layer norms
(``input_layernorm_moe_gen.weight``); the final gen norm is ``model.norm_moe_gen.weight``.

The sin-cos tables ``vit_pos_embed.pos_embed`` / ``latent_pos_embed.pos_embed`` are not parameters:
``sincos_tables`` gives their expected shapes (import checks them, then ignores the values) and their
values from the float64 formula (export writes them, rounded to bf16 like the official file).
"""

from __future__ import annotations

import numpy as np

from sgt_jax.checkpoint.table import Entry
from sgt_jax.models.posemb import sincos_2d_table_np

LLM = "language_model."
EXPERTS = (("und", ""), ("gen", "_moe_gen"))  # (our submodule, BAGEL suffix)


def _linear(path, key, out_dim, in_dim, *, out_split=None, in_split=None, bias=True, layers=None):
    """Entries for a PyTorch Linear ``key`` (``.weight`` (out,in) [+ ``.bias``]) -> our Dense at ``path``.

    ``out_split`` / ``in_split`` factor a dim into explicit head axes (e.g. ``(heads, head_dim)``); our
    kernel is (in factors..., out factors...)."""
    out_f = tuple(out_split) if out_split else (out_dim,)
    in_f = tuple(in_split) if in_split else (in_dim,)
    n_out, n_in = len(out_f), len(in_f)
    perm = tuple(range(n_out, n_out + n_in)) + tuple(range(n_out))  # (out..., in...) -> (in..., out...)
    rows = [Entry(path + ("kernel",), key + ".weight", (out_dim, in_dim), (out_f, in_f), perm, layers)]
    if bias:
        rows.append(Entry(path + ("bias",), key + ".bias", (out_dim,), (out_f,), None, layers))
    return rows


def _vector(path, key, dim, layers=None):
    return [Entry(path, key, (dim,), None, None, layers)]


def llm_table(m) -> list[Entry]:
    """Rows for ``Bagel.llm``: embeddings, both experts of every layer (stacked), final norms, lm_head."""
    c = m.llm
    h, nq, nkv, hd, inter, vocab, n = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                       c.intermediate_size, c.vocab_size, c.num_layers)
    rows = [
        Entry(("llm", "embed_tokens", "embedding"), LLM + "model.embed_tokens.weight", (vocab, h)),
        Entry(("llm", "lm_head", "kernel"), LLM + "lm_head.weight", (vocab, h), None, (1, 0)),
        *_vector(("llm", "norm", "scale"), LLM + "model.norm.weight", h),
        *_vector(("llm", "norm_gen", "scale"), LLM + "model.norm_moe_gen.weight", h),
    ]
    lay = LLM + "model.layers.{i}."
    for ours, sfx in EXPERTS:
        p = ("llm", "layers", ours)
        rows += _vector(p + ("input_norm", "scale"), lay + f"input_layernorm{sfx}.weight", h, n)
        rows += _vector(p + ("post_norm", "scale"), lay + f"post_attention_layernorm{sfx}.weight", h, n)
        rows += _linear(p + ("q_proj",), lay + f"self_attn.q_proj{sfx}", nq * hd, h, out_split=(nq, hd), layers=n)
        rows += _linear(p + ("k_proj",), lay + f"self_attn.k_proj{sfx}", nkv * hd, h, out_split=(nkv, hd), layers=n)
        rows += _linear(p + ("v_proj",), lay + f"self_attn.v_proj{sfx}", nkv * hd, h, out_split=(nkv, hd), layers=n)
        rows += _linear(p + ("o_proj",), lay + f"self_attn.o_proj{sfx}", h, nq * hd, in_split=(nq, hd),
                        bias=False, layers=n)
        rows += _vector(p + ("q_norm", "scale"), lay + f"self_attn.q_norm{sfx}.weight", hd, n)
        rows += _vector(p + ("k_norm", "scale"), lay + f"self_attn.k_norm{sfx}.weight", hd, n)
        for proj, o, i in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
            rows += _linear(p + ("mlp", proj), lay + f"mlp{sfx}.{proj}", o, i, bias=False, layers=n)
    return rows


def heads_table(m) -> list[Entry]:
    """Rows for the BAGEL heads: connector, timestep embedder, vae2llm, llm2vae."""
    h, hv = m.llm.hidden_size, m.vit.hidden_size
    latent = m.latent_patch_size ** 2 * m.vae.z_channels
    return [
        *_linear(("connector", "fc1"), "connector.fc1", h, hv),
        *_linear(("connector", "fc2"), "connector.fc2", h, h),
        *_linear(("time_embedder", "mlp_0"), "time_embedder.mlp.0", h, m.timestep_freq_dim),
        *_linear(("time_embedder", "mlp_2"), "time_embedder.mlp.2", h, h),
        *_linear(("vae2llm",), "vae2llm", h, latent),
        *_linear(("llm2vae",), "llm2vae", latent, h),
    ]


def sincos_tables(m) -> dict[str, tuple[int, int]]:
    """The fixed tables BAGEL stores: key -> (grid, dim) (shape (grid², dim))."""
    h = m.llm.hidden_size
    return {"vit_pos_embed.pos_embed": (m.vit.max_patches_per_side, h),
            "latent_pos_embed.pos_embed": (m.max_latent_size, h)}


def sincos_value(grid: int, dim: int) -> np.ndarray:
    """The table from the float64 formula (sgt_jax/models/posemb.py), as float64."""
    return sincos_2d_table_np(grid, dim)
