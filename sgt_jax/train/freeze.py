"""Which parameters train: every Bagel parameter belongs to exactly one freeze group.

Groups (config.train.freeze.<group> = True freezes it; SGT default: all False, song2yu/SGT `BAGEL/shells/train_sgt.sh`):
  vit          SigLIP NaViT (patch embedding, position embedding, layers, post-layernorm)
  connector    the ViT -> LLM MLP connector
  und          the understanding expert: llm.layers.und.*, the und final norm llm.norm
  gen          the generation expert: llm.layers.gen.*, llm.norm_gen, and the generation I/O modules
               vae2llm, llm2vae, time_embedder (they exist only for the gen path)
  embeddings   llm.embed_tokens
  lm_head      llm.lm_head
  vae          always frozen (not configurable)

Frozen parameters get no gradient at all (they are a separate input of the loss, not differentiated),
no optimizer state and no EMA: they are bitwise unchanged by training. ``model.freeze_und`` (the
model's stop-gradient on the und path, BAGEL's ``freeze_und``) is independent of this table.
An unclassified parameter path is an error, so a renamed module cannot silently change what trains.
"""

from __future__ import annotations

from flax import nnx

from sgt_jax.models.groups import GROUPS, group_of


def frozen_groups(config) -> frozenset[str]:
    """The set of frozen groups from ``config.train.freeze`` (the VAE always included)."""
    freeze = config.train.freeze
    unknown = set(freeze.keys()) - set(GROUPS)
    if unknown:
        raise ValueError(f"config.train.freeze has unknown group(s) {sorted(unknown)}; groups: {GROUPS}")
    return frozenset({"vae"} | {g for g in freeze.keys() if bool(freeze[g])})


def path_names(path) -> tuple[str, ...]:
    """Turn an nnx filter path (tuple of str/int keys) into names."""
    return tuple(str(k) for k in path)


def make_filters(config):
    """``(trainable_filter, frozen_filter)`` nnx filters (callables ``(path, value) -> bool``)."""
    frozen = frozen_groups(config)

    def is_frozen(path, value):
        return isinstance(value, nnx.Param) and group_of(path_names(path)) in frozen

    def is_trainable(path, value):
        return isinstance(value, nnx.Param) and group_of(path_names(path)) not in frozen

    return is_trainable, is_frozen


def flops_frozen_modules(config) -> tuple[str, ...]:
    """The frozen set in sgt_jax/train/flops.py module names (for the analytic MFU)."""
    frozen = frozen_groups(config)
    names = {"vit": ("vit",), "connector": ("connector",), "lm_head": ("lm_head",), "embeddings": ("embed",),
             "gen": ("vae2llm", "time_embedder", "llm2vae")}
    out = ["vae_encoder"]
    for g, mods in names.items():
        if g in frozen:
            out.extend(mods)
    if {"und", "gen"} <= frozen:  # flops.py counts the LLM as one module (both experts)
        out.append("llm")
    return tuple(out)
