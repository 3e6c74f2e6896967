"""BAGEL key table for the SigLIP NaViT ViT in the table format of table.py, and the in-memory ViT API on it.

One table serves both the streaming import/export (``vit_table`` rows inside ``convert.bagel_table``) and
whole state dicts (``vit_state_dict_to_params`` / ``params_to_vit_state_dict``: parity tests, small models).

Our side (sgt_jax/models/siglip_navit.py): ``vit.patch_embedding`` (kernel ``(3·ps², Hv)``),
``vit.position_embedding.embedding`` ``(G², Hv)``, stacked ``vit.layers.*`` (q/k/v kernels
``(Hv, heads, head_dim)``, out_proj ``(heads, head_dim, Hv)``, LayerNorms ``scale``/``bias``, ``mlp.fc1/fc2``),
``vit.post_layernorm``. PyTorch side (BAGEL's ``ema.safetensors``, official repository ByteDance-Seed/Bagel,
``modeling/bagel/siglip_navit.py``): ``vit_model.vision_model.*`` with the patch embedding already in Linear
form ``(Hv, 3·ps²)`` and ``vit_config.json``'s ``num_hidden_layers − 1`` encoder layers. The in-memory import
also accepts SigLIP's Conv2d patch embedding ``(Hv, 3, ps, ps)`` (``(O,C,kh,kw) -> (O,kh,kw,C)``, flattened);
export always writes the Linear form, as BAGEL stores it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sgt_jax.checkpoint.llm_tables import _linear
from sgt_jax.checkpoint.table import Entry, expected_shapes, state_dict_to_tree, tree_to_state_dict

VIT_PREFIX = "vit_model.vision_model."


def vit_rows(v, prefix: str = VIT_PREFIX) -> list[Entry]:
    """The rows of the ViT config ``v`` (``model.vit``), PyTorch keys under ``prefix``, our paths under ``vit``."""
    hv, inter, nh, n, ps, g = (int(v.hidden_size), int(v.intermediate_size), int(v.num_heads), int(v.num_layers),
                               int(v.patch_size), int(v.max_patches_per_side))
    if hv % nh:
        raise ValueError(f"model.vit.hidden_size {hv} is not divisible by model.vit.num_heads {nh}")
    hd = hv // nh
    rows = [
        *_linear(("vit", "patch_embedding"), prefix + "embeddings.patch_embedding", hv, 3 * ps * ps),
        Entry(("vit", "position_embedding", "embedding"), prefix + "embeddings.position_embedding.weight", (g * g, hv)),
        Entry(("vit", "post_layernorm", "scale"), prefix + "post_layernorm.weight", (hv,)),
        Entry(("vit", "post_layernorm", "bias"), prefix + "post_layernorm.bias", (hv,)),
    ]
    lay = prefix + "encoder.layers.{i}."
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


def vit_table(m) -> list[Entry]:
    """The ViT rows of the model config ``m`` (BAGEL's key prefix)."""
    return vit_rows(m.vit)


def vit_torch_shapes(cfg_vit, prefix: str = VIT_PREFIX) -> dict[str, tuple]:
    """Expected torch keys -> shapes (patch embedding in BAGEL's Linear form)."""
    return expected_shapes(vit_rows(cfg_vit, prefix))


def vit_state_dict_to_params(sd: Mapping[str, np.ndarray], cfg_vit, prefix: str = VIT_PREFIX) -> dict:
    """Torch ViT tensors (keys under ``prefix``; others are ignored) -> nested param dict of ``SiglipNaViT``.

    Raises ``ConversionError`` naming every missing, unexpected or mis-shaped key."""
    sd = {k: v for k, v in sd.items() if k.startswith(prefix)}
    key = prefix + "embeddings.patch_embedding.weight"
    hv, ps = int(cfg_vit.hidden_size), int(cfg_vit.patch_size)
    if key in sd and tuple(np.shape(sd[key])) == (hv, 3, ps, ps):  # SigLIP Conv2d form -> (O, kh*kw*C)
        w = np.asarray(sd[key])
        sd[key] = np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(hv, -1)
    return state_dict_to_tree(vit_rows(cfg_vit, prefix), sd, dtype=None, what="ViT state dict")["vit"]


def params_to_vit_state_dict(params: Mapping, cfg_vit, prefix: str = VIT_PREFIX) -> dict[str, np.ndarray]:
    """Nested ``SiglipNaViT`` param dict -> torch tensors (BAGEL naming, Linear patch embedding)."""
    return tree_to_state_dict(vit_rows(cfg_vit, prefix), {"vit": params})
