"""BAGEL-7B-MoT as one NNX module and its packed training forward (ByteDance-Seed/Bagel `modeling/bagel/bagel.py`).

Submodules: ``llm`` (Qwen2 MoT), ``vit`` (SigLIP NaViT), ``connector`` (1152→H→H, tanh-GELU),
``time_embedder``, ``vae2llm``, ``llm2vae`` (zero-init), ``vae`` (FLUX VAE, frozen by the optimizer).
The two fixed sin-cos tables are recomputed from position ids (sgt_jax/models/posemb.py).

``Bagel.forward(batch, x_t, t)`` follows docs/interfaces.md §2 exactly. The embedding assembly
writes, per token position: text -> ``embed_tokens``; ViT token -> ``connector(vit(patches)) +
sincos(vit_pos)`` gathered by ``vit_row``; latent token -> ``vae2llm(x_t) + time_embedder(t) +
sincos(latent_pos)``; pad -> 0. Everything is a static-shape gather/select (no scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sgt_jax.models.attention import TokenMeta, attention_blocks
from sgt_jax.models.flux_vae import FluxVAE
from sgt_jax.models.layers import Dense, canonical_dtype, constrain, gelu_tanh, zeros_init
from sgt_jax.models.posemb import TimestepEmbedder, sincos_2d
from sgt_jax.models.qwen2_mot import Qwen2MoT
from sgt_jax.models.siglip_navit import SiglipNaViT
from sgt_jax.parallel.mesh import Rules
from sgt_jax.parallel.sharding import abstract_params_of

KIND_PAD, KIND_TEXT, KIND_VIT, KIND_LATENT = 0, 1, 2, 3


class Connector(nnx.Module):
    """BAGEL ``MLPconnector``: ``fc2(gelu_tanh(fc1(x)))``, both with bias."""

    def __init__(self, in_dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(in_dim, hidden, ("vit_embed", "mlp"), **kw)
        self.fc2 = Dense(hidden, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


class Bagel(nnx.Module):
    """The whole model. ``with_vae=False`` leaves out the VAE (cached-latent training, parity tests)."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs, with_vae: bool = True):
        self.cfg = model_cfg
        h = model_cfg.llm.hidden_size
        self.dtype = canonical_dtype(model_cfg.dtype)
        param_dtype = canonical_dtype(model_cfg.param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden = h
        self.patch_latent_dim = model_cfg.latent_patch_size ** 2 * model_cfg.vae.z_channels
        self.vit_grid = model_cfg.vit.max_patches_per_side
        self.latent_grid = model_cfg.max_latent_size
        self.pos_table_dtype = jnp.dtype(model_cfg.pos_table_dtype)

        self.llm = Qwen2MoT(model_cfg, rngs=rngs)
        # All Bagel params are created unplaced (no mesh needed); placement comes from the logical names
        # through jit(out_shardings) (docs/interfaces.md §3). The vision modules use
        # nnx.with_partitioning, whose eager sharding would otherwise require a mesh here.
        with nnx.use_eager_sharding(False):
            self.vit = SiglipNaViT(model_cfg.vit, attention_impl=model_cfg.attention_impl,
                                   attention_chunk=model_cfg.attention_chunk,
                                   attention_blocks=attention_blocks(model_cfg),
                                   remat_policy=model_cfg.remat_policy, **kw)
            self.vae = FluxVAE(model_cfg.vae, rngs=rngs) if with_vae else None
        self.connector = Connector(model_cfg.vit.hidden_size, h, **kw)
        self.time_embedder = TimestepEmbedder(h, model_cfg.timestep_freq_dim, **kw)
        self.vae2llm = Dense(self.patch_latent_dim, h, ("latent", "embed"), use_bias=True, **kw)
        self.llm2vae = Dense(h, self.patch_latent_dim, ("embed", "latent"), use_bias=True,
                             kernel_init=zeros_init, **kw)

    # ---- embeddings (also used by inference) ----
    def embed_vit(self, patches, pos, image_id):
        """ViT rows -> LLM embeddings ``[B, P, H]``: ``connector(vit(...)) + sincos(pos)``."""
        v = self.connector(self.vit(patches, pos, image_id))
        return constrain(v + sincos_2d(pos, self.vit_grid, self.hidden, self.pos_table_dtype).astype(v.dtype), ("batch", "seq", "act_embed"))

    def embed_latents(self, x_t, t, latent_pos):
        """Latent rows -> LLM embeddings ``[B, Z, H]``: ``vae2llm(x_t) + time_embedder(t) + sincos(pos)``."""
        e = self.vae2llm(x_t) + self.time_embedder(t)
        return constrain(e + sincos_2d(latent_pos, self.latent_grid, self.hidden, self.pos_table_dtype).astype(e.dtype),
                         ("batch", "seq", "act_embed"))

    def embed_batch(self, batch, x_t, t):
        """The assembled ``[B, T, H]`` input embeddings of a packed batch and the und length ``U``."""
        tokens, kind = batch["tokens"], batch["kind"]
        b, total = tokens.shape
        z = batch["latent_pos"].shape[1] if "latent_pos" in batch else 0
        u = total - z
        if u < 0:
            raise ValueError(f"latent stream length {z} exceeds the token stream length {total}")
        parts = []
        if u:
            kind_u = kind[:, :u, None]
            emb = jnp.where(kind_u == KIND_TEXT, self.llm.embed(tokens[:, :u]), 0).astype(self.dtype)
            if "vit_patches" in batch and batch["vit_patches"].shape[1]:
                vit = self.embed_vit(batch["vit_patches"], batch["vit_pos"], batch["vit_image"])
                rows = jnp.take_along_axis(vit, batch["vit_row"][:, :u, None], axis=1)
                emb = jnp.where(kind_u == KIND_VIT, rows.astype(self.dtype), emb)
            parts.append(emb)
        if z:
            if x_t.shape != (b, z, self.patch_latent_dim) or t.shape != (b, z):
                raise ValueError(f"x_t {x_t.shape} / t {t.shape} must be [B, Z, {self.patch_latent_dim}] / [B, Z] "
                                 f"with B, Z = {b}, {z}")
            lat = self.embed_latents(x_t, t, batch["latent_pos"])
            parts.append(jnp.where(kind[:, u:, None] == KIND_LATENT, lat, 0).astype(self.dtype))
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return x, u

    # ---- training forward ----
    def forward(self, batch, x_t, t):
        """``(ce_hidden [B, L, H], velocity [B, Z, p·p·zc] fp32)`` for a packed batch (interfaces §2)."""
        x, u = self.embed_batch(batch, x_t, t)
        h, _, _ = self.llm(x, TokenMeta.from_batch(batch), batch["rope"], num_und=u)
        ce_hidden = constrain(jnp.take_along_axis(h, batch["ce_pos"][:, :, None], axis=1), ("batch", "seq", "act_embed"))
        if u < h.shape[1]:
            velocity = constrain(self.llm2vae(h[:, u:]).astype(jnp.float32), ("batch", "seq", None))
        else:
            velocity = jnp.zeros((h.shape[0], 0, self.patch_latent_dim), jnp.float32)
        return ce_hidden, velocity

    def lm_logits(self, h):
        """fp32 logits of hidden states ``[..., H]`` (callers chunk over L)."""
        return self.llm.logits(h)


# ---- abstract (never allocating) helpers ----
def abstract_bagel(model_cfg, *, with_vae: bool = True) -> Bagel:
    """A ``Bagel`` whose parameters are ``ShapeDtypeStruct``s (``nnx.eval_shape``): no memory allocated."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Bagel(model_cfg, rngs=nnx.Rngs(0), with_vae=with_vae))


def abstract_params(model_cfg, *, with_vae: bool = True, mesh: Mesh | None = None, rules: Rules = ()) -> dict:
    """Nested dict of ``ShapeDtypeStruct`` matching ``nnx.state(model, nnx.Param).to_pure_dict()``.

    Given a ``mesh`` (and the logical ``rules``), every leaf carries the NamedSharding its logical axis names
    map to: the target of a sharded restore, import or AOT compile. Allocates nothing
    (``parallel.sharding.abstract_params_of``)."""
    return abstract_params_of(lambda: Bagel(model_cfg, rngs=nnx.Rngs(0), with_vae=with_vae), mesh=mesh, rules=rules)


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays or ``ShapeDtypeStruct``s."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        n = 1
        for s in leaf.shape:
            n *= int(s)
        total += n
    return total
