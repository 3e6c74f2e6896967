"""BAGEL key table for the SigLIP NaViT ViT in the table format of table.py (streaming import/export).

The vision engineer's ``sgt_jax/checkpoint/vision_tables.py`` converts whole in-memory state dicts
(``vit_state_dict_to_params``); the streaming importer needs per-slice reads instead, which the
(reshape, transpose, stack) rows here provide. tests/unit/test_convert_tables.py checks that both give
bit-identical trees, so the two cannot drift apart silently.

Our side (sgt_jax/models/siglip_navit.py): ``vit.patch_embedding`` (kernel ``(3·ps², Hv)``),
``vit.position_embedding.embedding`` ``(G², Hv)``, stacked ``vit.layers.*`` (q/k/v kernels
``(Hv, heads, head_dim)``, out_proj ``(heads, head_dim, Hv)``, LayerNorms ``scale``/``bias``, ``mlp.fc1/fc2``),
``vit.post_layernorm``. PyTorch side (specs/bagel.md §4.2): ``vit_model.vision_model.*`` with the
patch embedding already in Linear form ``(Hv, 3·ps²)`` and ``json layers − 1`` encoder layers.
"""

from __future__ import annotations

from sgt_jax.checkpoint.llm_tables import _linear
from sgt_jax.checkpoint.table import Entry

VIT = "vit_model.vision_model."


def vit_table(m) -> list[Entry]:
    v = m.vit
    hv, inter, nh, n, ps, g = (v.hidden_size, v.intermediate_size, v.num_heads, v.num_layers, v.patch_size,
                               v.max_patches_per_side)
    if hv % nh:
        raise ValueError(f"model.vit.hidden_size {hv} is not divisible by model.vit.num_heads {nh}")
    hd = hv // nh
    rows = [
        *_linear(("vit", "patch_embedding"), VIT + "embeddings.patch_embedding", hv, 3 * ps * ps),
        Entry(("vit", "position_embedding", "embedding"), VIT + "embeddings.position_embedding.weight", (g * g, hv)),
        Entry(("vit", "post_layernorm", "scale"), VIT + "post_layernorm.weight", (hv,)),
        Entry(("vit", "post_layernorm", "bias"), VIT + "post_layernorm.bias", (hv,)),
    ]
    lay = VIT + "encoder.layers.{i}."
    p = ("vit", "layers")
    for proj in ("q_proj", "k_proj", "v_proj"):
        rows += _linear(p + ("self_attn", proj), lay + f"self_attn.{proj}", hv, hv, out_split=(nh, hd), layers=n)
    rows += _linear(p + ("self_attn", "out_proj"), lay + "self_attn.out_proj", hv, hv, in_split=(nh, hd), layers=n)
    for ln in ("layer_norm1", "layer_norm2"):
        rows.append(Entry(p + (ln, "scale"), lay + f"{ln}.weight", (hv,), layers=n))
        rows.append(Entry(p + (ln, "bias"), lay + f"{ln}.bias", (hv,), layers=n))
    rows += _linear(p + ("mlp", "fc1"), lay + "mlp.fc1", inter, hv, layers=n)
    rows += _linear(p + ("mlp", "fc2"), lay + "mlp.fc2", hv, inter, layers=n)
    return rows
