"""PyTorch <-> JAX name/shape tables for the FLUX VAE (the ViT's table is sgt_jax/checkpoint/vit_table.py).

Pure numpy (no torch, no jax needed): the import/export machinery and the parity tests call these.

* ``vae_state_dict_to_params(sd, cfg_vae)`` / ``params_to_vae_state_dict(params, cfg_vae)``: ``ae.safetensors``
  (FLUX naming, as BAGEL ships it: ByteDance-Seed/Bagel ``modeling/autoencoder.py``) <->
  ``sgt_jax.models.flux_vae.FluxVAE``. Import also accepts diffusers ``AutoencoderKL`` naming
  (``down_blocks.i.resnets.j``, ``mid_block.attentions.0.to_q`` as Linear, ...), which is renamed to FLUX
  naming first. Conv ``OIHW`` <-> ``HWIO``. Export writes FLUX naming.
* ``vae_torch_shapes``: the expected torch keys and shapes for a config, to check a folder's safetensors
  headers before reading any tensor (``check_vae_torch_shapes``).

Any missing, unexpected or mis-shaped key is an error that lists all of them at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

@dataclass(frozen=True)
class Rule:
    """One torch tensor <-> one slot of our param tree (``layer`` = index on the stacked axis, or None)."""

    torch_key: str
    path: tuple
    torch_shape: tuple
    jax_shape: tuple  # per-layer shape (without the stacked axis)
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None


def _norm_rules(torch_name, path, c, layer=None):
    ident = lambda a: a  # noqa: E731
    return [
        Rule(f"{torch_name}.weight", path + ("scale",), (c,), (c,), ident, ident, layer),
        Rule(f"{torch_name}.bias", path + ("bias",), (c,), (c,), ident, ident, layer),
    ]


def _conv_rules(torch_name, path, cin, cout, k):
    ident = lambda a: a  # noqa: E731
    return [
        Rule(f"{torch_name}.weight", path + ("kernel",), (cout, cin, k, k), (k, k, cin, cout),
             lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
             lambda w: np.ascontiguousarray(w.transpose(3, 2, 0, 1))),
        Rule(f"{torch_name}.bias", path + ("bias",), (cout,), (cout,), ident, ident),
    ]


# ---------------------------------------------------------------------------------------------- VAE


def _resnet_rules(t, p, cin, cout):
    rules = _norm_rules(t + "norm1", p + ("norm1",), cin) + _conv_rules(t + "conv1", p + ("conv1",), cin, cout, 3)
    rules += _norm_rules(t + "norm2", p + ("norm2",), cout) + _conv_rules(t + "conv2", p + ("conv2",), cout, cout, 3)
    if cin != cout:
        rules += _conv_rules(t + "nin_shortcut", p + ("nin_shortcut",), cin, cout, 1)
    return rules


def _mid_rules(t, p, c):
    rules = _resnet_rules(t + "block_1.", p + ("block_1",), c, c)
    rules += _norm_rules(t + "attn_1.norm", p + ("attn_1", "norm"), c)
    for name in ("q", "k", "v", "proj_out"):
        rules += _conv_rules(t + f"attn_1.{name}", p + ("attn_1", name), c, c, 1)
    return rules + _resnet_rules(t + "block_2.", p + ("block_2",), c, c)


def vae_rules(cfg_vae) -> list[Rule]:
    ch, mult, nrb = int(cfg_vae.ch), tuple(int(m) for m in cfg_vae.ch_mult), int(cfg_vae.num_res_blocks)
    zc, cin_img, cout_img = int(cfg_vae.z_channels), int(cfg_vae.in_channels), int(cfg_vae.out_channels)
    rules = _conv_rules("encoder.conv_in", ("encoder", "conv_in"), cin_img, ch, 3)
    in_mult = (1,) + mult
    for i, m in enumerate(mult):
        cin, cout = ch * in_mult[i], ch * m
        for j in range(nrb):
            rules += _resnet_rules(f"encoder.down.{i}.block.{j}.", ("encoder", "down", i, "block", j), cin, cout)
            cin = cout
        if i != len(mult) - 1:
            rules += _conv_rules(f"encoder.down.{i}.downsample.conv", ("encoder", "down", i, "downsample", "conv"),
                                 cout, cout, 3)
    c = ch * mult[-1]
    rules += _mid_rules("encoder.mid.", ("encoder", "mid"), c)
    rules += _norm_rules("encoder.norm_out", ("encoder", "norm_out"), c)
    rules += _conv_rules("encoder.conv_out", ("encoder", "conv_out"), c, 2 * zc, 3)
    rules += _conv_rules("decoder.conv_in", ("decoder", "conv_in"), zc, c, 3)
    rules += _mid_rules("decoder.mid.", ("decoder", "mid"), c)
    cin = c
    for lvl in reversed(range(len(mult))):
        cout = ch * mult[lvl]
        for j in range(nrb + 1):
            rules += _resnet_rules(f"decoder.up.{lvl}.block.{j}.", ("decoder", "up", lvl, "block", j), cin, cout)
            cin = cout
        if lvl != 0:
            rules += _conv_rules(f"decoder.up.{lvl}.upsample.conv", ("decoder", "up", lvl, "upsample", "conv"),
                                 cout, cout, 3)
    rules += _norm_rules("decoder.norm_out", ("decoder", "norm_out"), cin)
    rules += _conv_rules("decoder.conv_out", ("decoder", "conv_out"), cin, cout_img, 3)
    return rules


def vae_torch_shapes(cfg_vae) -> dict[str, tuple]:
    """Expected FLUX-named torch keys -> shapes (``ae.safetensors``)."""
    return {r.torch_key: r.torch_shape for r in vae_rules(cfg_vae)}


_DIFFUSERS_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_vae_key_to_flux(key: str, num_levels: int) -> str:
    """Rename one diffusers ``AutoencoderKL`` key to FLUX naming (keys already in FLUX naming pass through)."""
    k = key
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", k)
    if m:  # diffusers orders decoder blocks from the lowest resolution; FLUX indexes by resolution level
        lvl = num_levels - 1 - int(m.group(1))
        k = (f"decoder.up.{lvl}.block.{m.group(3)}.{m.group(4)}" if m.group(2) == "resnets"
             else f"decoder.up.{lvl}.upsample.{m.group(4)}")
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2.", k)
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", k)
    if m:
        k = f"{m.group(1)}.mid.attn_1.{_DIFFUSERS_ATTN[m.group(2)]}.{m.group(3)}"
    k = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", k)
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    return k


def _is_diffusers(sd) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd)


def _to_flux_naming(d: Mapping, num_levels: int, ndim: Callable, to_1x1: Callable) -> dict:
    """Rename diffusers keys to FLUX naming; ``to_1x1`` turns a mid-attention Linear weight (or its shape,
    ``ndim`` gives the rank of a value) into the 1x1-conv form."""
    out = {}
    for k, v in d.items():
        nk = diffusers_vae_key_to_flux(k, num_levels)
        if ".mid.attn_1." in nk and nk.endswith(".weight") and ndim(v) == 2:
            v = to_1x1(v)
        if nk in out:
            raise ValueError(f"VAE state dict: key {k!r} maps to FLUX key {nk!r}, which is already present")
        out[nk] = v
    return out


def vae_state_dict_to_params(sd: Mapping[str, np.ndarray], cfg_vae) -> dict:
    """Torch VAE tensors (FLUX or diffusers naming) -> nested param dict of ``FluxVAE``."""
    if _is_diffusers(sd):
        sd = _to_flux_naming(sd, len(cfg_vae.ch_mult), np.ndim, lambda w: np.asarray(w)[:, :, None, None])
    return _apply_rules(sd, vae_rules(cfg_vae), "VAE", None)


def params_to_vae_state_dict(params: Mapping, cfg_vae) -> dict[str, np.ndarray]:
    """Nested ``FluxVAE`` param dict -> torch tensors in FLUX naming (``ae.safetensors`` layout)."""
    return _invert_rules(params, vae_rules(cfg_vae), "VAE", None)


# ----------------------------------------------------------------------------------------- machinery


def check_torch_shapes(found: Mapping[str, tuple], expected: Mapping[str, tuple], what: str,
                       alternatives: Mapping[str, tuple] | None = None) -> None:
    """Raise ValueError listing every missing, unexpected and mis-shaped key (``found``: key -> shape)."""
    alternatives = alternatives or {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad = sorted(
        f"{k}: got {tuple(found[k])}, expected {expected[k]}"
        for k in set(found) & set(expected)
        if tuple(found[k]) != tuple(expected[k]) and tuple(found[k]) != alternatives.get(k)
    )
    if missing or unexpected or bad:
        parts = [f"{what} state dict does not match the config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
            if items:
                parts.append(f"  {len(items)} {title}:\n    " + "\n    ".join(items))
        raise ValueError("\n".join(parts))


def check_vae_torch_shapes(found: Mapping[str, tuple], cfg_vae) -> None:
    """Validate header shapes of a VAE file (FLUX naming; diffusers naming is renamed first)."""
    found = {k: tuple(v) for k, v in found.items()}
    if _is_diffusers(found):
        found = _to_flux_naming(found, len(cfg_vae.ch_mult), len, lambda s: tuple(s) + (1, 1))
    check_torch_shapes(found, vae_torch_shapes(cfg_vae), "VAE")


def _set(tree: dict, path: tuple, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _apply_rules(sd, rules, what, num_layers):
    expected = {r.torch_key: r.torch_shape for r in rules}
    check_torch_shapes({k: tuple(np.shape(v)) for k, v in sd.items()}, expected, what)
    out: dict = {}
    stacked: dict[tuple, list] = {}
    for r in rules:
        v = r.to_jax(np.asarray(sd[r.torch_key]))
        if r.layer is None:
            _set(out, r.path, v)
        else:
            stacked.setdefault(r.path, [None] * num_layers)[r.layer] = v
    for path, vals in stacked.items():
        _set(out, path, np.stack(vals, axis=0))
    return out


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def _invert_rules(params, rules, what, num_layers):
    want: dict[tuple, tuple] = {}
    for r in rules:
        want[r.path] = r.jax_shape if r.layer is None else (num_layers,) + r.jax_shape
    have = {path: tuple(np.shape(v)) for path, v in _flatten(params)}
    fmt = lambda p: ".".join(map(str, p))  # noqa: E731
    check_torch_shapes({fmt(p): s for p, s in have.items()}, {fmt(p): s for p, s in want.items()}, f"{what} params")
    sd = {}
    for r in rules:
        v = np.asarray(_get(params, r.path))
        if r.layer is not None:
            v = v[r.layer]
        sd[r.torch_key] = r.to_torch(v)
    return sd
