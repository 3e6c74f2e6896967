"""A BAGEL PyTorch checkpoint folder: open it, infer the architecture, refuse inconsistent folders.

Folder layout (the `ByteDance-Seed/BAGEL-7B-MoT` folder): ``llm_config.json`` (Qwen2Config), ``vit_config.json`` (SigLIP vision
config, listing one more layer than BAGEL builds), ``ema.safetensors`` (every Bagel weight, bf16) and
``ae.safetensors`` (the FLUX VAE, FLUX or diffusers ``AutoencoderKL`` naming). Tokenizer files are
optional here.

Everything here reads JSON and safetensors *headers* only, never tensor bytes: the architecture is
inferred from the two JSON files and the header shapes, and every disagreement between them is
collected and reported at once (``FolderError``) before the importer reads a single tensor.

What is inferred from where:
  llm.*            llm_config.json (hidden, layers, heads, kv heads, intermediate, vocab, rope θ, eps);
                   head_dim = hidden / heads (BAGEL's Qwen2 computes it), checked against q_norm.
  vit.*            vit_config.json; num_layers = json layers − 1 (BAGEL drops the last, spec §1.4);
                   max_patches_per_side = image_size / patch_size, checked against the position table.
  max_latent_size  sqrt(rows of latent_pos_embed.pos_embed).
  latent_patch_size sqrt(vae2llm in-features / z_channels); timestep_freq_dim = time_embedder.mlp.0 in.
  vae.*            ae.safetensors shapes: ch, ch_mult, num_res_blocks, z_channels, in/out channels.
Not inferable from a folder, taken from the given config (else the FLUX/BAGEL constants of
configs/bagel_sgt.py:7b): vae.num_groups, vae.scale_factor, vae.shift_factor, special token ids, and
all compute settings (dtype, remat, attention implementation).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field

import ml_collections

from sgt_jax.checkpoint.safetensors_io import TensorInfo, read_header
from sgt_jax.checkpoint.table import ConversionError

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"
REQUIRED_FILES = (LLM_CONFIG, VIT_CONFIG, EMA_FILE, AE_FILE)
# Tensors BAGEL stores but we recompute from the formula (ByteDance-Seed/Bagel `modeling/bagel/modeling_utils.py` `PositionEmbedding`).
SINCOS_KEYS = ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")


class FolderError(ConversionError):
    """The folder is incomplete or its configs disagree with its tensor headers."""

    def __init__(self, problems, path):
        super().__init__(problems, f"BAGEL folder {path}")


@dataclass
class BagelFolder:
    path: str
    llm_config: dict
    vit_config: dict
    ema_header: dict[str, TensorInfo]
    ae_header: dict[str, TensorInfo]
    vae_naming: str  # "flux" | "diffusers"
    extra_files: list[str] = field(default_factory=list)  # tokenizer etc., copied on export if asked

    @property
    def ema_path(self) -> str:
        return os.path.join(self.path, EMA_FILE)

    @property
    def ae_path(self) -> str:
        return os.path.join(self.path, AE_FILE)


def open_folder(path: str) -> BagelFolder:
    """Read the two JSON configs and the two safetensors headers of a BAGEL folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BAGEL folder not found: {path}")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FolderError([f"missing file: {f}" for f in missing], path)
    configs = {}
    for name in (LLM_CONFIG, VIT_CONFIG):
        with open(os.path.join(path, name)) as f:
            try:
                configs[name] = json.load(f)
            except json.JSONDecodeError as err:
                raise FolderError([f"{name} is not valid JSON: {err}"], path) from err
    ema = read_header(os.path.join(path, EMA_FILE))
    ae = read_header(os.path.join(path, AE_FILE))
    extra = sorted(f for f in os.listdir(path) if f not in REQUIRED_FILES and not f.startswith("."))
    return BagelFolder(path, configs[LLM_CONFIG], configs[VIT_CONFIG], ema, ae, vae_naming(ae), extra)


def vae_naming(ae_header) -> str:
    """'flux' (encoder.down.0.block.0...) or 'diffusers' (encoder.down_blocks.0.resnets.0...)."""
    keys = list(ae_header)
    if any(k.startswith("encoder.down.") for k in keys):
        return "flux"
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "diffusers"
    raise ValueError("ae.safetensors holds neither FLUX-named (encoder.down.N...) nor diffusers-named "
                     f"(encoder.down_blocks.N...) VAE weights; first keys: {sorted(keys)[:5]}")


def _layer_count(header, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in header if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def _json_int(cfg: dict, key: str, where: str, problems: list[str]):
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        problems.append(f"{where}: '{key}' missing or not an integer (got {v!r})")
        return None
    return v


def _shape(header, key, problems, what):
    if key not in header:
        problems.append(f"missing in {what}: {key} (needed to infer the architecture)")
        return None
    return header[key].shape


def _square_root(n: int, what: str, problems) -> int | None:
    r = math.isqrt(n)
    if r * r != n:
        problems.append(f"{what}: {n} rows is not a square grid")
        return None
    return r


def infer_vae(ae_header, naming: str, problems: list[str], what: str = AE_FILE) -> dict:
    """VAE dims from ae.safetensors shapes (either naming)."""
    if naming == "flux":
        down, block, conv2 = r"encoder\.down\.(\d+)\.", r"encoder\.down\.0\.block\.(\d+)\.", \
            "encoder.down.{l}.block.0.conv2.weight"
    else:
        down, block, conv2 = r"encoder\.down_blocks\.(\d+)\.", r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", \
            "encoder.down_blocks.{l}.resnets.0.conv2.weight"
    conv_in = _shape(ae_header, "encoder.conv_in.weight", problems, what)
    conv_out = _shape(ae_header, "encoder.conv_out.weight", problems, what)
    dec_out = _shape(ae_header, "decoder.conv_out.weight", problems, what)
    levels = _layer_count(ae_header, down)
    blocks = _layer_count(ae_header, block)
    if conv_in is None or conv_out is None or dec_out is None or not levels or not blocks:
        if not levels or not blocks:
            problems.append(f"{what}: cannot find the encoder's down levels / res blocks")
        return {}
    ch = conv_in[0]
    mult = []
    for lvl in range(levels):
        s = _shape(ae_header, conv2.format(l=lvl), problems, what)
        if s is None:
            return {}
        if s[0] % ch:
            problems.append(f"{what}: level {lvl} has {s[0]} channels, not a multiple of conv_in's {ch}")
            return {}
        mult.append(s[0] // ch)
    if conv_out[0] % 2:
        problems.append(f"{what}: encoder.conv_out has {conv_out[0]} channels; expected 2·z_channels")
        return {}
    return dict(in_channels=conv_in[1], out_channels=dec_out[0], ch=ch, ch_mult=tuple(mult),
                num_res_blocks=blocks, z_channels=conv_out[0] // 2)


def infer_model_config(folder: BagelFolder, base_model: ml_collections.ConfigDict | None = None):
    """The model config of ``folder`` (a copy of ``base_model`` with every architecture field replaced).

    Raises ``FolderError`` listing every JSON field that is missing or disagrees with the headers.
    """
    if base_model is None:
        from sgt_jax.configs_util import load_config

        base_model = load_config("bagel_sgt.py:7b").model
    m = copy.deepcopy(base_model)
    problems: list[str] = []
    ema, lc, vc = folder.ema_header, folder.llm_config, folder.vit_config
    E = EMA_FILE

    # ---- LLM ----
    hidden = _json_int(lc, "hidden_size", LLM_CONFIG, problems)
    n_layers = _json_int(lc, "num_hidden_layers", LLM_CONFIG, problems)
    heads = _json_int(lc, "num_attention_heads", LLM_CONFIG, problems)
    kv = _json_int(lc, "num_key_value_heads", LLM_CONFIG, problems)
    inter = _json_int(lc, "intermediate_size", LLM_CONFIG, problems)
    vocab = _json_int(lc, "vocab_size", LLM_CONFIG, problems)
    head_dim = None
    if hidden and heads:
        if hidden % heads:
            problems.append(f"{LLM_CONFIG}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        else:
            head_dim = hidden // heads
            if lc.get("head_dim") not in (None, head_dim):
                problems.append(f"{LLM_CONFIG}: head_dim {lc['head_dim']} != hidden_size/num_attention_heads "
                                f"= {head_dim} (BAGEL's Qwen2 uses the latter)")
    if lc.get("tie_word_embeddings"):
        problems.append(f"{LLM_CONFIG}: tie_word_embeddings is true, but BAGEL forces an untied lm_head")
    for key in ("rope_theta", "rms_norm_eps"):
        if not isinstance(lc.get(key), (int, float)):
            problems.append(f"{LLM_CONFIG}: '{key}' missing or not a number (got {lc.get(key)!r})")
    p = "language_model.model."
    checks = [  # (key, expected shape from the JSON)
        (p + "embed_tokens.weight", (vocab, hidden)),
        ("language_model.lm_head.weight", (vocab, hidden)),
        (p + "layers.0.self_attn.q_proj.weight", (heads * head_dim if heads and head_dim else None, hidden)),
        (p + "layers.0.self_attn.k_proj.weight", (kv * head_dim if kv and head_dim else None, hidden)),
        (p + "layers.0.self_attn.q_norm.weight", (head_dim,)),
        (p + "layers.0.mlp.gate_proj.weight", (inter, hidden)),
    ]
    in_file = _layer_count(ema, r"language_model\.model\.layers\.(\d+)\.")
    if n_layers is not None and in_file != n_layers:
        problems.append(f"{LLM_CONFIG} says num_hidden_layers={n_layers}, {E} holds {in_file} LLM layers")

    # ---- ViT ----
    vh = _json_int(vc, "hidden_size", VIT_CONFIG, problems)
    vi = _json_int(vc, "intermediate_size", VIT_CONFIG, problems)
    vheads = _json_int(vc, "num_attention_heads", VIT_CONFIG, problems)
    vlayers_json = _json_int(vc, "num_hidden_layers", VIT_CONFIG, problems)
    ps = _json_int(vc, "patch_size", VIT_CONFIG, problems)
    img = _json_int(vc, "image_size", VIT_CONFIG, problems)
    nch = vc.get("num_channels", 3)
    mpps = None
    if ps and img:
        if img % ps:
            problems.append(f"{VIT_CONFIG}: image_size {img} is not a multiple of patch_size {ps}")
        else:
            mpps = img // ps
    if vc.get("rope"):
        problems.append(f"{VIT_CONFIG}: rope is true; BAGEL-7B-MoT's ViT uses learned positions (rope=False)")
    v = "vit_model.vision_model."
    checks += [
        (v + "embeddings.patch_embedding.weight", (vh, nch * ps * ps if ps else None)),
        (v + "embeddings.position_embedding.weight", (mpps * mpps if mpps else None, vh)),
        (v + "encoder.layers.0.mlp.fc1.weight", (vi, vh)),
        ("connector.fc1.weight", (hidden, vh)),
        ("vit_pos_embed.pos_embed", (mpps * mpps if mpps else None, hidden)),
    ]
    vit_in_file = _layer_count(ema, r"vit_model\.vision_model\.encoder\.layers\.(\d+)\.")
    if vlayers_json is not None and vit_in_file != vlayers_json - 1:
        problems.append(f"{VIT_CONFIG} lists num_hidden_layers={vlayers_json}, so BAGEL builds "
                        f"{vlayers_json - 1} ViT layers, but {E} holds {vit_in_file}")
    if vheads and vh and vh % vheads:
        problems.append(f"{VIT_CONFIG}: hidden_size {vh} not divisible by num_attention_heads {vheads}")

    # ---- heads, latent geometry ----
    mls = None
    lat = _shape(ema, "latent_pos_embed.pos_embed", problems, E)
    if lat is not None:
        mls = _square_root(lat[0], f"{E}: latent_pos_embed.pos_embed", problems)
        if hidden and lat[1] != hidden:
            problems.append(f"{E}: latent_pos_embed.pos_embed has width {lat[1]}, hidden_size is {hidden}")
    vae = infer_vae(folder.ae_header, folder.vae_naming, problems)
    lps = None
    v2l = _shape(ema, "vae2llm.weight", problems, E)
    if v2l is not None and vae:
        z = vae["z_channels"]
        if v2l[1] % z:
            problems.append(f"{E}: vae2llm.weight in-features {v2l[1]} is not a multiple of the VAE's "
                            f"z_channels {z} ({AE_FILE})")
        else:
            lps = _square_root(v2l[1] // z, f"{E}: vae2llm in-features / z_channels", problems)
        checks.append(("vae2llm.weight", (hidden, v2l[1])))
    te = _shape(ema, "time_embedder.mlp.0.weight", problems, E)
    freq = te[1] if te is not None else None
    checks.append(("time_embedder.mlp.0.weight", (hidden, freq)))

    for key, want in checks:
        got = ema[key].shape if key in ema else None
        if got is None:
            problems.append(f"missing in {E}: {key}")
        elif None not in want and tuple(got) != tuple(want):
            problems.append(f"{E}: {key} has shape {list(got)}, the configs imply {list(want)}")
    if problems:
        raise FolderError(problems, folder.path)

    m.llm.update(dict(hidden_size=hidden, num_layers=n_layers, num_heads=heads, num_kv_heads=kv,
                      head_dim=head_dim, intermediate_size=inter, vocab_size=vocab,
                      rope_theta=float(lc["rope_theta"]), rms_norm_eps=float(lc["rms_norm_eps"])))
    m.vit.update(dict(hidden_size=vh, intermediate_size=vi, num_heads=vheads, num_layers=vlayers_json - 1,
                      patch_size=ps, max_patches_per_side=mpps,
                      layer_norm_eps=float(vc.get("layer_norm_eps", m.vit.layer_norm_eps))))
    m.vae.update(vae)
    m.latent_patch_size = lps
    m.max_latent_size = mls
    m.timestep_freq_dim = freq
    return m


def architecture_diff(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
    """Architecture fields where two model configs differ ("llm.hidden_size: 64 -> 3584")."""
    out = []
    fields = {"llm": ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                      "vocab_size", "rope_theta", "rms_norm_eps"),
              "vit": ("hidden_size", "intermediate_size", "num_heads", "num_layers", "patch_size",
                      "max_patches_per_side", "layer_norm_eps"),
              "vae": ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels"),
              "": ("latent_patch_size", "max_latent_size", "timestep_freq_dim")}
    for sec, names in fields.items():
        for n in names:
            va = a[sec][n] if sec else a[n]
            vb = b[sec][n] if sec else b[n]
            if (tuple(va) if isinstance(va, (list, tuple)) else va) != \
                    (tuple(vb) if isinstance(vb, (list, tuple)) else vb):
                out.append(f"{sec + '.' if sec else ''}{n}: {va} -> {vb}")
    return out


# ---- writing the JSON configs on export ----------------------------------------------------------


def llm_config_json(m: ml_collections.ConfigDict, template: dict | None = None) -> dict:
    """A Qwen2Config JSON for BAGEL's LLM (the source folder's own JSON, updated, when known)."""
    llm = m.llm
    out = dict(template) if template else {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "attention_dropout": 0.0, "initializer_range": 0.02, "max_position_embeddings": 32768,
        "max_window_layers": llm.num_layers, "rope_scaling": None, "sliding_window": 131072,
        "use_sliding_window": False, "use_cache": True, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645,
        # BAGEL forces these in code; listing them documents the architecture.
        "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer",
    }
    out.update({"hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_layers,
                "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
                "intermediate_size": llm.intermediate_size, "vocab_size": llm.vocab_size,
                "rope_theta": llm.rope_theta, "rms_norm_eps": llm.rms_norm_eps,
                "tie_word_embeddings": False})
    return out


def vit_config_json(m: ml_collections.ConfigDict, template: dict | None = None) -> dict:
    """A SigLIP vision config JSON listing num_layers + 1 layers, as the official folder does."""
    vit = m.vit
    out = dict(template) if template else {
        "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "num_channels": 3,
        "attention_dropout": 0.0,
    }
    out.update({"hidden_size": vit.hidden_size, "intermediate_size": vit.intermediate_size,
                "num_attention_heads": vit.num_heads, "num_hidden_layers": vit.num_layers + 1,
                "patch_size": vit.patch_size, "image_size": vit.patch_size * vit.max_patches_per_side,
                "layer_norm_eps": vit.layer_norm_eps})
    return out
