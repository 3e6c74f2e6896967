"""OmniGen2 ``transformer/`` (diffusers-format ``OmniGen2Transformer2DModel``) <-> our ``OmniGen2DiT``, as
data (see table.py), and the ``transformer/config.json`` <-> model config mapping.

PyTorch side: the module tree of the official ``transformer_omnigen2.py`` (VectorSpaceLab/OmniGen2),
diffusers ``Attention`` names (``attn.to_q``, ``attn.to_out.0``, ``attn.norm_q``), ``Sequential`` indices
in ``time_caption_embed.caption_embedder.{0,1}``; a modulated block's ``norm1`` is ``LuminaRMSNormZero``
(``norm1.linear`` [4·H, temb] in the order scale_msa, gate_msa, scale_mlp, gate_mlp, and ``norm1.norm``),
the context refiner's ``norm1`` a plain RMSNorm (``norm1.weight``). The FFN is ``linear_1`` (gate,
SiLU), ``linear_3`` (up), ``linear_2`` (down).

Our side (sgt_jax/models/omnigen2_dit.py): Dense kernels ``(in, out)`` with head axes explicit; the
modulation kernel ``(temb, 4, H)``; the four block stacks carry a leading ``layers`` axis.
q/k columns are NOT permuted: the rotary embedding pairs adjacent dims (2i, 2i+1) in both codes.
"""

from __future__ import annotations

import ml_collections

from sgt_jax.checkpoint.llm_tables import _linear as linear_rows
from sgt_jax.checkpoint.llm_tables import _vector as vector_rows
from sgt_jax.checkpoint.table import Entry
from sgt_jax.models import omnigen2_dit as dit

STACKS = (("noise_refiner", True), ("ref_image_refiner", True), ("context_refiner", False), ("layers", True))

# transformer/config.json keys that define the architecture (diffusers' from_pretrained names)
CONFIG_KEYS = ("patch_size", "in_channels", "out_channels", "hidden_size", "num_layers", "num_refiner_layers",
               "num_attention_heads", "num_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
               "axes_dim_rope", "axes_lens", "text_feat_dim", "timestep_scale")


def _block_rows(c, stack: str, n: int, modulated: bool) -> list[Entry]:
    h, nq, nkv, hd, inter, td = (c.hidden_size, c.num_attention_heads, c.num_kv_heads, dit.head_dim(c),
                                 dit.ffn_dim(c), dit.temb_dim(c))
    p, k = (stack,), stack + ".{i}."
    rows = []
    rows += linear_rows(p + ("to_q",), k + "attn.to_q", nq * hd, h, out_split=(nq, hd), bias=False, layers=n)
    rows += linear_rows(p + ("to_k",), k + "attn.to_k", nkv * hd, h, out_split=(nkv, hd), bias=False, layers=n)
    rows += linear_rows(p + ("to_v",), k + "attn.to_v", nkv * hd, h, out_split=(nkv, hd), bias=False, layers=n)
    rows += linear_rows(p + ("to_out",), k + "attn.to_out.0", h, nq * hd, in_split=(nq, hd), bias=False, layers=n)
    rows += vector_rows(p + ("norm_q", "scale"), k + "attn.norm_q.weight", hd, n)
    rows += vector_rows(p + ("norm_k", "scale"), k + "attn.norm_k.weight", hd, n)
    for ours, theirs, o, i in (("gate_proj", "linear_1", inter, h), ("up_proj", "linear_3", inter, h),
                               ("down_proj", "linear_2", h, inter)):
        rows += linear_rows(p + ("feed_forward", ours), k + "feed_forward." + theirs, o, i, bias=False, layers=n)
    if modulated:
        rows += vector_rows(p + ("norm1", "scale"), k + "norm1.norm.weight", h, n)
        rows += linear_rows(p + ("modulation",), k + "norm1.linear", 4 * h, td, out_split=(4, h), layers=n)
    else:
        rows += vector_rows(p + ("norm1", "scale"), k + "norm1.weight", h, n)
    for norm in ("norm2", "ffn_norm1", "ffn_norm2"):
        rows += vector_rows(p + (norm, "scale"), k + norm + ".weight", h, n)
    return rows


def dit_table(c) -> list[Entry]:
    """Every row of the DiT (3,967,161,400 parameters for the released config)."""
    h, pd, td = c.hidden_size, dit.patch_dim(c), dit.temb_dim(c)
    tce = "time_caption_embed."
    rows = [
        *linear_rows(("x_embedder",), "x_embedder", h, pd),
        *linear_rows(("ref_image_patch_embedder",), "ref_image_patch_embedder", h, pd),
        Entry(("image_index_embedding",), "image_index_embedding", (dit.MAX_REF_IMAGES, h)),
        *linear_rows(("time_embedder", "mlp_0"), tce + "timestep_embedder.linear_1", td, dit.FREQ_DIM),
        *linear_rows(("time_embedder", "mlp_2"), tce + "timestep_embedder.linear_2", td, td),
        *vector_rows(("caption_norm", "scale"), tce + "caption_embedder.0.weight", c.text_feat_dim),
        *linear_rows(("caption_proj",), tce + "caption_embedder.1", h, c.text_feat_dim),
        *linear_rows(("norm_out", "linear_1"), "norm_out.linear_1", h, td),
        *linear_rows(("norm_out", "linear_2"), "norm_out.linear_2", pd, h),
    ]
    for stack, modulated in STACKS:
        n = c.num_layers if stack == "layers" else c.num_refiner_layers
        rows += _block_rows(c, stack, n, modulated)
    return rows


def config_from_json(cfg_json: dict, base: ml_collections.ConfigDict | None = None, where: str = "config.json"):
    """``transformer/config.json`` -> our DiT config (compute settings from ``base``, default
    ``released_config()``). Missing keys take the *code defaults* of the official constructor only where
    diffusers would too; every problem is collected into ``ValueError`` lines."""
    c = ml_collections.ConfigDict((base or dit.released_config()).to_dict())
    problems = []
    for key in CONFIG_KEYS:
        if key not in cfg_json:
            if key in ("out_channels", "ffn_dim_multiplier"):
                continue
            problems.append(f"{where}: missing field {key!r}")
            continue
        v = cfg_json[key]
        if key in ("axes_dim_rope", "axes_lens"):
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(isinstance(x, int) for x in v):
                problems.append(f"{where}: {key} must be a list of 3 integers, got {v!r}")
                continue
            v = tuple(v)
        elif key in ("norm_eps", "timestep_scale"):
            if not isinstance(v, (int, float)):
                problems.append(f"{where}: {key} must be a number, got {v!r}")
                continue
            v = float(v)
        elif key == "ffn_dim_multiplier":
            if v is not None and not isinstance(v, (int, float)):
                problems.append(f"{where}: ffn_dim_multiplier must be a number or null, got {v!r}")
                continue
        elif key == "out_channels":
            if v is None:
                v = cfg_json.get("in_channels")
            elif not isinstance(v, int):
                problems.append(f"{where}: out_channels must be an integer or null, got {v!r}")
                continue
        elif not isinstance(v, int) or isinstance(v, bool):
            problems.append(f"{where}: {key} must be an integer, got {v!r}")
            continue
        c[key] = v
    if not problems:
        try:
            dit.validate(c)
        except ValueError as err:
            problems.append(f"{where}: {err}")
    if problems:
        raise ValueError("\n".join(problems))
    return c


def config_to_json(c, template: dict | None = None) -> dict:
    """Our DiT config -> ``transformer/config.json`` (the template's other fields kept)."""
    out = dict(template or {"_class_name": "OmniGen2Transformer2DModel"})
    for key in CONFIG_KEYS:
        v = c[key]
        if key == "out_channels" and key in out and out[key] is None and v == c.in_channels:
            continue  # null means "same as in_channels": keep the source's spelling
        out[key] = list(v) if isinstance(v, tuple) else v
    return out
