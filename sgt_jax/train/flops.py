"""Analytic FLOPs per training step and MFU for BAGEL-MoT SGT.

Why analytic: MFU must be computed from *model* FLOPs (what the maths needs), not from the FLOPs the
compiler emits (those include remat recompute and any wasted work, e.g. masked attention blocks). This
module counts the model FLOPs of one packed training step from the model config and the static pack
budgets, term by term, so the count can be checked by hand (tests/unit/test_flops.py does that on the
tiny config) and compared with the compiler's ``cost_analysis`` (sgt_jax/compile.py).

Conventions (the formula, stated once):

* A matmul of an ``[n, a]`` activation with an ``[a, b]`` weight costs ``2·n·a·b`` forward FLOPs.
  Backward costs twice the forward (input gradient + weight gradient), so a *trainable* layer costs
  ``3 × forward`` = the familiar ``6·N·tokens``. A *frozen* layer costs ``2 × forward`` when something
  upstream of it is trainable (its input gradient is still needed) and ``1 × forward`` when nothing
  upstream is (e.g. the VAE encoder, or a frozen ViT).
* Each MoT expert's matmuls run only on that expert's tokens: the und expert on the ``U`` und positions
  (text + ViT tokens), the gen expert on the ``Z`` latent positions (docs/interfaces.md §1).
* The LM head runs only on the ``L`` labelled positions; ``llm2vae`` on the ``Z`` latent rows;
  ``vae2llm`` and the timestep embedder on the ``Z`` latent rows; the connector on the ``P`` ViT
  patches (one LLM token per patch); the ViT on the ``P`` patches. Embedding lookups cost 0.
* Attention (LLM): per attended (query, key) pair and per layer, ``QKᵀ`` and ``PV`` cost
  ``2·2·n_heads·head_dim`` forward FLOPs. The number of attended pairs per pack is, by default, the
  **causal half** ``T·(T+1)/2`` of the whole pack (MaxText's convention). BAGEL packs hold several
  documents and noise splits that nobody attends to, so the true count is smaller; pass
  ``llm_pairs=attended_pairs(batch)`` for the exact count of one batch. ViT attention is bidirectional
  inside each image: by default ``P·min(P, max_patches_per_side²)`` pairs (an upper bound: a patch sees
  at most one whole image), or pass ``vit_pairs`` exactly.
* Not counted: norms, softmax, activations, RoPE, the loss itself, the optimizer and EMA updates
  (all O(parameters) or O(tokens·hidden), < 1 % at 7B).
* Remat (activation recomputation) is *not* model FLOPs. ``remat_recompute_flops`` gives the extra
  forward FLOPs of the rematerialised modules separately, so ``model + recompute`` estimates what the
  hardware executes (full remat of every trainable layer: ``4/3 ×`` the trainable model FLOPs).
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Mapping

import numpy as np

# ---------------------------------------------------------------------------------------------------
# Chips: peak dense bf16 FLOP/s and HBM per chip. Source: Cloud TPU public documentation, "System
# architecture" pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), key-specification tables:
#   v4:  275 TFLOP/s (bf16), HBM2 32 GiB          v5e: 197 TFLOP/s (bf16), HBM 16 GB
#   v5p: 459 TFLOP/s (bf16), HBM2e 95 GB          v6e: 918 TFLOP/s (bf16), HBM 32 GB
# The docs write "GB" for v5e/v5p/v6e; we take the number as GiB-free bytes ×10⁹ where they say GB, which
# is the conservative reading for a fits / does-not-fit verdict.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # per chip, dense
    hbm_bytes: int  # per chip
    cores_per_chip: int  # TensorCores; "v4-32"/"v5p-16" count cores, "v5litepod-64"/"v6e-64" count chips


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * 2**30, 2),
    "v5e": Chip("v5e", 197e12, 16 * 10**9, 1),
    "v5p": Chip("v5p", 459e12, 95 * 10**9, 2),
    "v6e": Chip("v6e", 918e12, 32 * 10**9, 1),
}
CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6e": "v6e", "v4": "v4", "v5p": "v5p", "v5e": "v5e"}


def chip(name: str) -> Chip:
    """Look a chip up by generation name (``v4``, ``v5e``/``v5litepod``, ``v5p``, ``v6e``)."""
    key = CHIP_ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown TPU chip {name!r}; known: {sorted(CHIP_ALIASES)}")
    return CHIPS[key]


# jax ``device.device_kind`` strings (as libtpu reports them) -> chip. v5p reports "TPU v5", v5e
# "TPU v5 lite", v6e "TPU v6 lite" (checked against abstract devices in tests/unit/test_compile.py).
_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5": "v5p", "tpu v5p": "v5p", "tpu v5 lite": "v5e", "tpu v5e": "v5e",
                 "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def chip_from_device_kind(device_kind: str) -> Chip | None:
    """The chip of a jax device (``jax.devices()[0].device_kind``), or None when it is not a known TPU."""
    key = _DEVICE_KINDS.get(device_kind.strip().lower())
    return CHIPS[key] if key else None


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, peak_flops: float | str) -> float:
    """Model FLOPs utilisation: ``flops_per_step / (step_time · n_devices · peak)``.

    ``flops_per_step`` is the *global* model FLOPs of one step (all packs on all devices);
    ``peak_flops`` is per device, in FLOP/s, or a chip name from :data:`CHIPS`.
    """
    if step_time_s <= 0 or n_devices <= 0:
        raise ValueError(f"step_time_s and n_devices must be > 0, got {step_time_s}, {n_devices}")
    peak = chip(peak_flops).peak_bf16_flops if isinstance(peak_flops, str) else float(peak_flops)
    return flops_per_step / (step_time_s * n_devices * peak)


def tflops_per_device(flops_per_step: float, step_time_s: float, n_devices: int) -> float:
    """Achieved model TFLOP/s per device."""
    return flops_per_step / step_time_s / n_devices / 1e12


# ---------------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackBudgets:
    """Static per-pack budgets (docs/interfaces.md §1): U und tokens, Z latent tokens, P ViT patches,
    L CE labels, NI VAE image slots (online VAE only) on a ``vae_canvas`` = (H, W) pixel canvas."""

    und_tokens: int
    gen_tokens: int
    vit_patches: int
    ce_labels: int
    vae_images: int = 0
    vae_canvas: tuple[int, int] = (0, 0)

    @property
    def tokens(self) -> int:
        return self.und_tokens + self.gen_tokens


def budgets_from_config(config) -> PackBudgets:
    """Read :class:`PackBudgets` from ``config.data.pack`` (field names owned by sgt_jax/data)."""
    pack = config.data.pack
    get = lambda *names, default=None: next(  # noqa: E731
        (getattr(pack, n) for n in names if n in pack), default)
    u, z = get("und_tokens", "U"), get("gen_tokens", "latent_tokens", "Z")
    p, lab = get("vit_patches", "P"), get("ce_labels", "L")
    missing = [n for n, v in (("und_tokens", u), ("gen_tokens", z), ("vit_patches", p), ("ce_labels", lab))
               if v is None]
    if missing:
        raise ValueError(f"config.data.pack lacks budget field(s) {missing}; has {sorted(pack.keys())}")
    ni = get("vae_images", "NI", default=0)
    canvas = get("vae_canvas", default=None)
    if canvas is None:  # online VAE canvas: the VAE transform's max side, square (sgt_jax/data transforms)
        side = int(config.data.transforms.vae[0]) if "transforms" in config.data else 0
        canvas = (side, side)
    return PackBudgets(int(u), int(z), int(p), int(lab), int(ni), (int(canvas[0]), int(canvas[1])))


# ---------------------------------------------------------------------------------------------------
# Per-module forward FLOPs per row
# ---------------------------------------------------------------------------------------------------


def llm_layer_matmul_params(llm) -> int:
    """Matmul weights of one expert of one MoT layer (q,k,v,o + SwiGLU MLP); biases/norms excluded."""
    h, hd = llm.hidden_size, llm.head_dim
    q, kv = llm.num_heads * hd, llm.num_kv_heads * hd
    return h * q + 2 * h * kv + q * h + 3 * h * llm.intermediate_size


def vit_layer_matmul_params(vit) -> int:
    """Matmul weights of one SigLIP encoder layer (q,k,v,out + fc1,fc2)."""
    d = vit.hidden_size
    return 4 * d * d + 2 * d * vit.intermediate_size


def vae_encoder_flops(vae, height: int, width: int) -> int:
    """Forward FLOPs of the FLUX VAE encoder on one ``height × width`` image (convs + mid attention).

    A k×k conv from c_in to c_out on an h×w output grid costs ``2·h·w·k²·c_in·c_out``.
    """
    if height % 8 or width % 8:
        raise ValueError(f"VAE canvas must be a multiple of 8, got {height}x{width}")
    conv = lambda h, w, k, ci, co: 2 * h * w * k * k * ci * co  # noqa: E731
    chans = [vae.ch * m for m in vae.ch_mult]
    h, w, total = height, width, conv(height, width, 3, vae.in_channels, vae.ch)
    c_in = vae.ch
    for level, c_out in enumerate(chans):
        for _ in range(vae.num_res_blocks):
            total += conv(h, w, 3, c_in, c_out) + conv(h, w, 3, c_out, c_out)
            if c_in != c_out:
                total += conv(h, w, 1, c_in, c_out)
            c_in = c_out
        if level != len(chans) - 1:  # Downsample: pad (0,1,0,1), 3×3 stride 2
            h, w = h // 2, w // 2
            total += conv(h, w, 3, c_in, c_in)
    c = c_in
    res_block = 2 * conv(h, w, 3, c, c)
    attn = 4 * conv(h, w, 1, c, c) + 2 * 2 * (h * w) ** 2 * c  # q,k,v,proj + QKᵀ and PV
    total += 2 * res_block + attn
    total += conv(h, w, 3, c, 2 * vae.z_channels)
    return total


# Module graph for the frozen/trainable multiplier: module -> modules whose outputs feed it.
_PARENTS = {
    "vae_encoder": (),
    "vit": (),
    "connector": ("vit",),
    "time_embedder": (),
    "vae2llm": ("vae_encoder",),
    "embed": (),
    "llm": ("connector", "time_embedder", "vae2llm", "embed"),
    "lm_head": ("llm",),
    "llm2vae": ("llm",),
}
MODULES = tuple(_PARENTS)


def _ancestors(name: str, parents: Mapping[str, tuple[str, ...]]) -> set[str]:
    out, todo = set(), list(parents[name])
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(parents[p])
    return out


def pass_multiplier(name: str, frozen: Collection[str], parents: Mapping[str, tuple[str, ...]] | None = None) -> int:
    """3 for a trainable module, 2 for a frozen one with a trainable ancestor, else 1 (forward only).
    ``parents``: the module graph (module -> modules feeding it); default BAGEL's."""
    parents = _PARENTS if parents is None else parents
    if name not in frozen:
        return 3
    return 2 if any(a not in frozen for a in _ancestors(name, parents)) else 1


# ---------------------------------------------------------------------------------------------------
# The step count
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one step, per module (already × the pass multiplier) and forward-only."""

    by_module: Mapping[str, float]
    forward_by_module: Mapping[str, float]
    packs: int

    @property
    def total(self) -> float:
        return float(sum(self.by_module.values()))

    @property
    def per_pack(self) -> float:
        return self.total / self.packs

    def remat_recompute_flops(self, modules: Collection[str] = ("vit", "llm")) -> float:
        """Extra FLOPs of recomputing the forward of ``modules`` once in the backward pass (full remat
        of those layer stacks). Not model FLOPs: report it separately (hardware ≈ total + this)."""
        return float(sum(self.forward_by_module.get(m, 0.0) for m in modules))


def step_flops(model, budgets: PackBudgets, *, packs: int = 1, frozen: Collection[str] = ("vae_encoder",),
               vae_online: bool = False, llm_pairs: float | None = None,
               vit_pairs: float | None = None) -> StepFlops:
    """Analytic model FLOPs of one training step over ``packs`` packs (see the module docstring).

    Args:
      model: ``config.model`` (llm, vit, vae sub-configs, latent_patch_size, timestep_freq_dim).
      budgets: per-pack static budgets.
      packs: packs per step (global batch B).
      frozen: module names (from :data:`MODULES`) that get no weight gradient. The VAE is always frozen.
      vae_online: count the VAE encoder (inside the step) instead of cached latent statistics.
      llm_pairs / vit_pairs: attended (query, key) pairs per pack (LLM per layer, ViT per layer); default
        causal half of the pack / ``P·min(P, max_patches_per_side²)``.
    """
    unknown = set(frozen) - set(MODULES)
    if unknown:
        raise ValueError(f"unknown module(s) in frozen: {sorted(unknown)}; known: {MODULES}")
    frozen = set(frozen) | {"vae_encoder"}
    llm, vit = model.llm, model.vit
    H = llm.hidden_size
    U, Z, P, L, T = budgets.und_tokens, budgets.gen_tokens, budgets.vit_patches, budgets.ce_labels, budgets.tokens
    latent_dim = model.latent_patch_size ** 2 * model.vae.z_channels
    patch_dim = 3 * vit.patch_size ** 2

    if llm_pairs is None:
        llm_pairs = T * (T + 1) / 2
    if vit_pairs is None:
        vit_pairs = P * min(P, vit.max_patches_per_side ** 2)

    fwd: dict[str, float] = {}
    # LLM: und expert on U rows, gen expert on Z rows, per layer; + joint attention over attended pairs.
    layer_mm = llm_layer_matmul_params(llm)
    fwd["llm"] = llm.num_layers * (2 * layer_mm * (U + Z) + 4 * llm.num_heads * llm.head_dim * llm_pairs)
    fwd["lm_head"] = 2 * H * llm.vocab_size * L
    # ViT: patch embedding + layers + bidirectional per-image attention.
    d = vit.hidden_size
    fwd["vit"] = 2 * patch_dim * d * P + vit.num_layers * (
        2 * vit_layer_matmul_params(vit) * P + 4 * d * vit_pairs)  # heads·head_dim == hidden
    fwd["connector"] = 2 * (d * H + H * H) * P
    fwd["vae2llm"] = 2 * latent_dim * H * Z
    fwd["time_embedder"] = 2 * (model.timestep_freq_dim * H + H * H) * Z
    fwd["llm2vae"] = 2 * H * latent_dim * Z
    fwd["embed"] = 0.0
    if vae_online:
        hc, wc = budgets.vae_canvas
        if budgets.vae_images <= 0 or hc <= 0 or wc <= 0:
            raise ValueError("vae_online needs budgets.vae_images > 0 and a vae_canvas (H, W)")
        fwd["vae_encoder"] = budgets.vae_images * vae_encoder_flops(model.vae, hc, wc)
    else:
        fwd["vae_encoder"] = 0.0

    fwd = {k: float(v) * packs for k, v in fwd.items()}
    total = {k: v * pass_multiplier(k, frozen) for k, v in fwd.items()}
    return StepFlops(by_module=total, forward_by_module=fwd, packs=packs)


def active_params(model) -> dict[str, int]:
    """Matmul parameters a token touches (for the ``6·N_active·tokens`` headline): one LLM expert,
    lm_head, ViT, connector. Norms, biases and embeddings (lookups) are excluded."""
    llm, vit = model.llm, model.vit
    return {
        "llm_expert": llm.num_layers * llm_layer_matmul_params(llm),
        "lm_head": llm.hidden_size * llm.vocab_size,
        "vit": vit.num_layers * vit_layer_matmul_params(vit) + 3 * vit.patch_size ** 2 * vit.hidden_size,
        "connector": vit.hidden_size * llm.hidden_size + llm.hidden_size ** 2,
    }


# ---------------------------------------------------------------------------------------------------
# Exact attended pairs of one packed batch (host side, numpy)
# ---------------------------------------------------------------------------------------------------

MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2


def attended_pairs(doc: np.ndarray, split: np.ndarray, mode: np.ndarray, order: np.ndarray) -> int:
    """Number of (query, key) pairs the BAGEL attention rule allows in a packed batch ([B, T] arrays).

    Rule (docs/interfaces.md §1): same doc, and (``order[k] <= order[q]`` or same split with q in a
    full/noise split), and not (k in a noise split other than q's). Pad tokens (doc < 0) count nothing.
    Per query this is: non-noise keys of its doc with ``order <= order[q]`` outside its own split, plus
    either the whole own split (full/noise) or the own-split keys up to ``order[q]`` (causal). O(T log T).
    """
    doc, split, mode, order = (np.asarray(a) for a in (doc, split, mode, order))
    if doc.ndim == 1:
        doc, split, mode, order = (a[None] for a in (doc, split, mode, order))
    total = 0
    for b in range(doc.shape[0]):
        real = doc[b] >= 0
        d, s, m, o = doc[b][real], split[b][real], mode[b][real], order[b][real]
        for dv in np.unique(d):
            sel = d == dv
            ss, mm, oo = s[sel], m[sel], o[sel]
            idx = np.argsort(oo, kind="stable")
            ss, mm, oo = ss[idx], mm[idx], oo[idx]
            non_noise_upto = np.cumsum(mm != MODE_NOISE)  # keys with order <= order[q] that are not noise
            # own split: its size, and how many of its members come at or before q (1-based rank in split)
            _, inv, counts = np.unique(ss, return_inverse=True, return_counts=True)
            by_split = np.argsort(inv, kind="stable")
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            own_upto = np.empty(len(oo), np.int64)
            own_upto[by_split] = np.arange(len(oo)) - first[inv[by_split]] + 1
            own_non_noise_upto = np.where(mm != MODE_NOISE, own_upto, 0)
            outside = non_noise_upto - own_non_noise_upto  # non-noise keys before q, other splits
            inside = np.where(mm == MODE_CAUSAL, own_upto, counts[inv])
            total += int(outside.sum() + inside.sum())
    return total
