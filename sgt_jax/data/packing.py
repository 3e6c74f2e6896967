"""Packing plans into the static-shape batch of docs/interfaces.md §1.

A pack has fixed budgets (``config.data.pack``): ``U`` und tokens, ``Z`` gen (latent) tokens, ``P`` ViT
patches, ``L`` CE labels and ``NI`` VAE image slots. Documents (plans, sgt_jax/data/plans.py) are laid out
one after the other in their ORIGINAL order (``order``), then each token is moved to its expert's half:
kinds 1-2 (text, markers, ViT) to ``[0, U)`` and kind 3 (latents) to ``[U, U+Z)``, each half keeping the
original relative order. Latent row ``i`` of the latent stream is token ``U+i``.

Padding: ``tokens 0, kind 0, doc -1, split -1, mode 0, rope 0, vit_row 0``; pad tokens get the ``order``
values after all real tokens (so ``order`` is a permutation of ``[0, T)``). ViT pad rows: zeros, ``vit_image
-1``. Latent pad rows: ``latent_image -1``, ``latent_target False``. CE pad: ``ce_valid False``.

Which samples go into a batch is decided by the mixer (sgt_jax/data/mixing.py); this module checks that they
fit (:meth:`PackUsage.fits`), chooses their packs (:func:`place`, :func:`pack_plans`) and writes arrays
(:func:`assemble_batch`). The bookkeeping keys
(never fed to jit) are ``n_seg, n_vqa, n_docs`` int32 [B] and ``useful_und, useful_gen, useful_vit,
useful_ce, useful_vae`` int32 [B] (real entries per budget; ``useful/budget`` is the packing efficiency).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sgt_jax.data.plans import KIND_LATENT
from sgt_jax.data.transforms import normalize

BOOKKEEPING_KEYS = ("n_seg", "n_vqa", "n_docs", "useful_und", "useful_gen", "useful_vit", "useful_ce",
                    "useful_vae")


@dataclasses.dataclass(frozen=True)
class PackBudget:
    """Static per-pack budgets (config.data.pack)."""

    und_tokens: int
    gen_tokens: int
    vit_patches: int
    ce_labels: int
    vae_images: int

    @classmethod
    def from_config(cls, config) -> "PackBudget":
        p = config.data.pack
        out = cls(p.und_tokens, p.gen_tokens, p.vit_patches, p.ce_labels, p.vae_images)
        for f in dataclasses.fields(out):
            if getattr(out, f.name) <= 0:
                raise ValueError(f"config.data.pack.{f.name} must be > 0, got {getattr(out, f.name)}")
        if out.vit_patches > out.und_tokens or out.ce_labels > out.und_tokens:
            raise ValueError(f"config.data.pack: vit_patches ({out.vit_patches}) and ce_labels ({out.ce_labels}) "
                             f"cannot exceed und_tokens ({out.und_tokens}): both live in the und half")
        return out

    @property
    def total_tokens(self) -> int:
        return self.und_tokens + self.gen_tokens


_USAGE_FIELDS = (("und", "n_und", "und_tokens"), ("gen", "n_gen", "gen_tokens"), ("vit", "n_vit", "vit_patches"),
                 ("ce", "n_ce", "ce_labels"), ("vae", "n_vae", "vae_images"))


@dataclasses.dataclass
class PackUsage:
    """What one pack being filled already holds."""

    und: int = 0
    gen: int = 0
    vit: int = 0
    ce: int = 0
    vae: int = 0
    plans: list = dataclasses.field(default_factory=list)

    def fits(self, plan: dict, budget: PackBudget) -> bool:
        return all(getattr(self, u) + plan[n] <= getattr(budget, b) for u, n, b in _USAGE_FIELDS)

    def add(self, plan: dict) -> None:
        for u, n, _ in _USAGE_FIELDS:
            setattr(self, u, getattr(self, u) + plan[n])
        self.plans.append(plan)


def place(packs: list[PackUsage], plan: dict, budget: PackBudget, reserve: float = 0.0, min_gen: int = 0) -> int:
    """The pack ``plan`` goes to, or -1 if it fits none. A plan with latents (segmentation) avoids leaving
    1..``min_gen``-1 free gen tokens (room no other latent block can use), and otherwise goes where the most gen
    tokens stay free (worst fit: the latents spread, so every pack keeps und room for its share); any other
    plan (VQA) goes where the fewest und tokens stay free (best fit). ``reserve`` > 0 admits a plan without
    latents only where ``reserve`` und tokens per free gen token stay free (the und tokens that the latents
    still to come bring along). Ties: the lower pack."""
    best, best_key = -1, None
    for j, p in enumerate(packs):
        if reserve and not plan["n_gen"] and \
                p.und + plan["n_und"] + reserve * (budget.gen_tokens - p.gen) > budget.und_tokens:
            continue
        if p.fits(plan, budget):
            if plan["n_gen"]:
                free = budget.gen_tokens - p.gen - plan["n_gen"]
                key = (free if free < min_gen else 0, -free)
            else:
                key = (0, budget.und_tokens - p.und)
            if best_key is None or key < best_key:
                best, best_key = j, key
    return best


def pack_plans(plans: list[dict], n_packs: int, budget: PackBudget) -> list[int] | None:
    """A pack index for each plan such that no pack exceeds ``budget``, or None if this packing finds none.

    First-fit decreasing with :func:`place`: plans with latents first, largest ``n_gen`` first, then the others,
    largest ``n_und`` first (ties: the earlier plan). Deterministic."""
    order = sorted(range(len(plans)), key=lambda i: (plans[i]["n_gen"] == 0, -plans[i]["n_gen"], -plans[i]["n_und"], i))
    packs = [PackUsage() for _ in range(n_packs)]
    where = [0] * len(plans)
    for i in order:
        j = place(packs, plans[i], budget)
        if j < 0:
            return None
        packs[j].add(plans[i])
        where[i] = j
    return where


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Everything static about a batch: budgets, patch vector size, latent format, canvas."""

    budget: PackBudget
    vit_dim: int  # 3·ps·ps
    latent_dim: int  # p·p·zc
    latents: str  # "online" | "cached"
    canvas: tuple[int, int]  # (Hc, Wc) of vae_images (online mode)

    @classmethod
    def from_config(cls, config) -> "BatchLayout":
        m = config.model
        if config.data.latents not in ("online", "cached"):
            raise ValueError(f"config.data.latents must be 'online' or 'cached', got {config.data.latents!r}")
        side = config.data.transforms.vae[0]
        return cls(PackBudget.from_config(config), 3 * m.vit.patch_size ** 2,
                   m.latent_patch_size ** 2 * m.vae.z_channels, config.data.latents, (side, side))


def empty_batch(layout: BatchLayout, b: int) -> dict:
    """An all-padding batch of ``b`` packs (every key of docs/interfaces.md §1 plus bookkeeping)."""
    bud = layout.budget
    t, z, p, l, ni = bud.total_tokens, bud.gen_tokens, bud.vit_patches, bud.ce_labels, bud.vae_images
    i32 = np.int32
    out = {
        "tokens": np.zeros((b, t), i32), "kind": np.zeros((b, t), i32), "doc": np.full((b, t), -1, i32),
        "split": np.full((b, t), -1, i32), "mode": np.zeros((b, t), i32),
        "order": np.broadcast_to(np.arange(t, dtype=i32), (b, t)).copy(), "rope": np.zeros((b, t), i32),
        "vit_row": np.zeros((b, t), i32),
        "vit_patches": np.zeros((b, p, layout.vit_dim), np.float32), "vit_pos": np.zeros((b, p), i32),
        "vit_image": np.full((b, p), -1, i32),
        "latent_pos": np.zeros((b, z), i32), "latent_image": np.full((b, z), -1, i32),
        "latent_target": np.zeros((b, z), bool),
        "ce_pos": np.zeros((b, l), i32), "ce_label": np.zeros((b, l), i32), "ce_valid": np.zeros((b, l), bool),
    }
    if layout.latents == "online":
        out["vae_images"] = np.zeros((b, ni) + tuple(layout.canvas) + (3,), np.float32)
        out["latent_rc"] = np.zeros((b, z, 2), i32)
    else:
        out["latent_mean"] = np.zeros((b, z, layout.latent_dim), np.float32)
        out["latent_logvar"] = np.zeros((b, z, layout.latent_dim), np.float32)
    for k in BOOKKEEPING_KEYS:
        out[k] = np.zeros((b,), i32)
    return out


def _write_pack(out: dict, i: int, plans: list[dict], layout: BatchLayout) -> None:
    """Writes the documents ``plans`` into row ``i`` of the batch ``out`` (already padding)."""
    bud = layout.budget
    u_cap = bud.und_tokens
    order = 0  # running original index
    und = gen = vit = ce = slot = split = n_img = 0
    for doc, plan in enumerate(plans):
        kind = plan["kind"]
        n = kind.size
        is_gen = kind == KIND_LATENT
        # physical position of each local token: und tokens fill [und, und+n_und), gen [U+gen, U+gen+n_gen)
        phys = np.empty(n, np.int64)
        phys[~is_gen] = und + np.arange(plan["n_und"])
        phys[is_gen] = u_cap + gen + np.arange(plan["n_gen"])
        out["tokens"][i, phys] = plan["tokens"]
        out["kind"][i, phys] = kind
        out["doc"][i, phys] = doc
        out["split"][i, phys] = plan["split"] + split
        out["mode"][i, phys] = plan["mode"]
        out["order"][i, phys] = order + np.arange(n)
        out["rope"][i, phys] = plan["rope"]
        vit_tok = phys[kind == 2]
        out["vit_row"][i, vit_tok] = vit + np.arange(plan["n_vit"])
        # ViT patch stream
        pv = plan["n_vit"]
        out["vit_patches"][i, vit:vit + pv] = normalize(plan["vit_patches"])
        out["vit_pos"][i, vit:vit + pv] = plan["vit_pos"]
        out["vit_image"][i, vit:vit + pv] = plan["vit_image"] + n_img
        # latent stream (row r <-> token U + r)
        zg = plan["n_gen"]
        sl = slice(gen, gen + zg)
        out["latent_pos"][i, sl] = plan["latent_pos"]
        out["latent_image"][i, sl] = plan["latent_image"] + slot
        out["latent_target"][i, sl] = plan["latent_target"]
        if layout.latents == "online":
            out["latent_rc"][i, sl] = plan["latent_rc"]
            for j, vimg in enumerate(plan["vae_images"]):
                h, w = vimg.shape[:2]
                out["vae_images"][i, slot + j, :h, :w] = normalize(vimg)
        else:
            out["latent_mean"][i, sl] = plan["latent_mean"]
            out["latent_logvar"][i, sl] = plan["latent_logvar"]
        # CE labels: local token index -> physical position (always und: labels sit on text tokens)
        nl = plan["n_ce"]
        out["ce_pos"][i, ce:ce + nl] = phys[plan["ce_pos"]]
        out["ce_label"][i, ce:ce + nl] = plan["ce_label"]
        out["ce_valid"][i, ce:ce + nl] = True
        order += n
        und += plan["n_und"]
        gen += zg
        vit += pv
        ce += nl
        slot += plan["n_vae"]
        n_img += int(plan["vit_image"].max()) + 1 if pv else 0
        split += int(plan["split"].max()) + 1 if n else 0
    # pad tokens take the order values after the real ones (order stays a permutation of [0, T))
    pad = out["doc"][i] < 0
    out["order"][i, pad] = order + np.arange(int(pad.sum()))
    out["n_seg"][i] = sum(p["group"] == "seg" for p in plans)
    out["n_vqa"][i] = sum(p["group"] == "vqa" for p in plans)
    out["n_docs"][i] = len(plans)
    out["useful_und"][i], out["useful_gen"][i], out["useful_vit"][i] = und, gen, vit
    out["useful_ce"][i], out["useful_vae"][i] = ce, slot


def assemble_batch(packs: list[list[dict]], layout: BatchLayout) -> dict:
    """Host batch dict (docs/interfaces.md §1) from ``packs``: one list of plans per pack.

    Raises ValueError if a pack exceeds a budget (the mixer must have checked with :class:`PackUsage`).
    """
    for j, plans in enumerate(packs):
        usage = PackUsage()
        for p in plans:
            if not usage.fits(p, layout.budget):
                raise ValueError(f"pack {j} overflows the budget {layout.budget} at sample {p['key']!r}")
            usage.add(p)
            if layout.latents == "online":
                for img in p["vae_images"]:
                    if img.shape[0] > layout.canvas[0] or img.shape[1] > layout.canvas[1]:
                        raise ValueError(f"VAE image {img.shape[:2]} of {p['key']!r} exceeds canvas {layout.canvas}")
            elif "latent_mean" not in p:
                raise ValueError(f"cached latents mode but plan {p['key']!r} has no latent_mean (latent cache)")
    out = empty_batch(layout, len(packs))
    for j, plans in enumerate(packs):
        _write_pack(out, j, plans, layout)
    return out


def efficiency(batch: dict, budget: PackBudget) -> dict:
    """Useful fraction of each budget over the batch (host bookkeeping -> metrics)."""
    b = batch["n_docs"].shape[0]
    return {
        "und": float(batch["useful_und"].sum()) / (b * budget.und_tokens),
        "gen": float(batch["useful_gen"].sum()) / (b * budget.gen_tokens),
        "tokens": float(batch["useful_und"].sum() + batch["useful_gen"].sum()) / (b * budget.total_tokens),
        "vit": float(batch["useful_vit"].sum()) / (b * budget.vit_patches),
        "ce": float(batch["useful_ce"].sum()) / (b * budget.ce_labels),
        "vae": float(batch["useful_vae"].sum()) / (b * budget.vae_images),
    }
