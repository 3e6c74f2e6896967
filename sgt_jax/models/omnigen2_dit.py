"""OmniGen2's diffusion transformer (``OmniGen2Transformer2DModel``) in Flax NNX.

Official code: VectorSpaceLab/OmniGen2, ``omnigen2/models/transformers/transformer_omnigen2.py`` (the
model and its block), ``block_lumina2.py`` (time/caption embedding, the modulated norms, the SwiGLU),
``repo.py`` (Omni-RoPE) and ``omnigen2/models/attention_processor.py`` (attention). Paper: arXiv 2506.18871.

What it computes, in order (all images are padded token arrays, see omnigen2_inputs.py):

1. ``temb = timestep_embedder(sinusoid(1000·t))`` (width ``min(hidden, 1024)``); the caption
   ``caption_embedder = RMSNorm -> Linear`` on every text position; the text is refined by
   ``context_refiner`` (unmodulated blocks, no temb).
2. Target tokens: ``x_embedder`` then ``noise_refiner`` (modulated). Reference-image tokens:
   ``ref_image_patch_embedder``, ``+ image_index_embedding[r]``, then ``ref_image_refiner`` with every
   reference image as its own row (images do not see each other there).
3. ``layers``: modulated blocks over the joint sequence of valid text, reference and target tokens,
   fully bidirectional, with Omni-RoPE; then ``norm_out`` (parameter-free LayerNorm · (1 + scale),
   Linear) gives the velocity of the target tokens.

Block (the same class for all four stacks): ``h = RMSNorm(x)·(1 + scale_msa)``;
``x += tanh(gate_msa)·RMSNorm(Attn(h))``; ``x += tanh(gate_mlp)·RMSNorm(FFN(RMSNorm(x)·(1 + scale_mlp)))``.
No shift terms; scales/gates come from ``Linear(SiLU(temb))`` in the order scale_msa, gate_msa,
scale_mlp, gate_mlp. Unmodulated blocks drop the scales and gates. Attention: q/k/v without bias,
per-head RMSNorm on q and k, then the interleaved-pair rotary embedding, GQA (query head j uses KV
head j // group), scale 1/sqrt(head_dim), key-padding mask.

Joint sequence layout (a choice, not the official one): the official code compacts each sample to
``[valid text | ref 1 | ... | target | padding]``. Attention here is fully bidirectional within the
valid tokens and positions enter only through the rotary ids, so the result does not depend on the
physical order; we keep ``[text (padded) | ref slots (padded) | target (padded)]`` with a validity
mask instead, which needs no data-dependent gather and keeps every shape static. Padding queries
produce 0 (their outputs are never used); only the float summation order of the softmax differs.

Parameters: fp32 master weights (``param_dtype``), compute in ``dtype``; every parameter carries
logical axis names; the four stacks are stacked on a leading ``layers`` axis and scanned, each scan
body wrapped in the ``remat_policy`` (sgt_jax/models/remat.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgt_jax.models import attention as attn_lib
from sgt_jax.models import omnigen2_inputs as inputs
from sgt_jax.models.attention import FULL, TokenMeta
from sgt_jax.models.layers import Dense, RMSNorm, SwiGLU, canonical_dtype, constrain, make_param, zeros_init
from sgt_jax.models.posemb import TimestepEmbedder
from sgt_jax.models.remat import remat

ROPE_THETA = 10000.0
MAX_REF_IMAGES = 5  # rows of image_index_embedding
FREQ_DIM = 256


def released_config() -> ml_collections.ConfigDict:
    """The released OmniGen2 DiT (``options/ft.yml`` ``arch_opt`` of the official repository): 3.97 B params."""
    return ml_collections.ConfigDict(dict(
        patch_size=2, in_channels=16, out_channels=16, hidden_size=2520, num_layers=32, num_refiner_layers=2,
        num_attention_heads=21, num_kv_heads=7, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
        axes_dim_rope=(40, 40, 40), axes_lens=(10000, 10000, 10000), text_feat_dim=2048, timestep_scale=1000.0,
        dtype="bfloat16", param_dtype="float32", attention_impl="chunked", attention_chunk=1024,
        remat_policy="full", scan_layers=True))


def tiny_config() -> ml_collections.ConfigDict:
    """A tiny random-weights config with the released structure (tests, the fixture folder)."""
    c = released_config()
    c.update(dict(hidden_size=48, num_layers=2, num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2,
                  multiple_of=16, axes_dim_rope=(4, 4, 4), axes_lens=(300, 64, 64), text_feat_dim=40,
                  dtype="float32", attention_impl="dense", remat_policy="none"))
    return c


def head_dim(c) -> int:
    return c.hidden_size // c.num_attention_heads


def ffn_dim(c) -> int:
    """``LuminaFeedForward``'s inner width: ``4·hidden`` (× ffn_dim_multiplier), rounded up to ``multiple_of``."""
    inner = 4 * c.hidden_size
    if c.ffn_dim_multiplier is not None:
        inner = int(c.ffn_dim_multiplier * inner)
    return c.multiple_of * -(-inner // c.multiple_of)


def temb_dim(c) -> int:
    return min(c.hidden_size, 1024)


def patch_dim(c) -> int:
    return c.patch_size ** 2 * c.in_channels


def validate(c) -> None:
    """Clear errors for configs the model cannot be built from."""
    problems = []
    if c.hidden_size % c.num_attention_heads:
        problems.append(f"hidden_size {c.hidden_size} is not divisible by num_attention_heads {c.num_attention_heads}")
    elif sum(c.axes_dim_rope) != head_dim(c):
        problems.append(f"sum(axes_dim_rope) = {sum(c.axes_dim_rope)} must equal head_dim = {head_dim(c)}")
    if c.num_attention_heads % c.num_kv_heads:
        problems.append(f"num_attention_heads {c.num_attention_heads} not divisible by num_kv_heads {c.num_kv_heads}")
    if len(c.axes_dim_rope) != 3 or len(c.axes_lens) != 3:
        problems.append("axes_dim_rope and axes_lens need 3 entries (sequence, row, column)")
    if (c.out_channels or c.in_channels) != c.in_channels:
        problems.append(f"out_channels {c.out_channels} != in_channels {c.in_channels} is not supported")
    if c.attention_impl not in attn_lib.IMPLS:
        problems.append(f"unknown attention_impl {c.attention_impl!r}; choose one of {attn_lib.IMPLS}")
    if problems:
        raise ValueError("OmniGen2 DiT config: " + "; ".join(problems))


class Block(nnx.Module):
    """``OmniGen2TransformerBlock``; ``modulated=False`` is the context refiner's variant."""

    def __init__(self, c, modulated: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, nq, nkv, hd = c.hidden_size, c.num_attention_heads, c.num_kv_heads, head_dim(c)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.modulated = modulated
        self.to_q = Dense(h, (nq, hd), ("embed", "q_heads", "head_dim"), use_bias=False, **kw)
        self.to_k = Dense(h, (nkv, hd), ("embed", "kv_heads", "head_dim"), use_bias=False, **kw)
        self.to_v = Dense(h, (nkv, hd), ("embed", "kv_heads", "head_dim"), use_bias=False, **kw)
        self.to_out = Dense((nq, hd), h, ("q_heads", "head_dim", "embed"), use_bias=False, **kw)
        self.norm_q = RMSNorm(hd, c.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.norm_k = RMSNorm(hd, c.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.feed_forward = SwiGLU(h, ffn_dim(c), **kw)  # linear_1 = gate, linear_3 = up, linear_2 = down
        self.norm1 = RMSNorm(h, c.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = RMSNorm(h, c.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.ffn_norm1 = RMSNorm(h, c.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.ffn_norm2 = RMSNorm(h, c.norm_eps, param_dtype=param_dtype, rngs=rngs)
        # (scale_msa, gate_msa, scale_mlp, gate_mlp) from SiLU(temb); zero init: the block starts as identity
        self.modulation = Dense(temb_dim(c), (4, h), ("mlp", None, "embed"), use_bias=True,
                                kernel_init=zeros_init, **kw) if modulated else None

    def __call__(self, x, temb, cos, sin, meta: TokenMeta, *, impl: str, chunk: int):
        if self.modulated:
            mod = self.modulation(jax.nn.silu(temb))  # [B, 4, H]
            scale_msa, gate_msa, scale_mlp, gate_mlp = (mod[:, i, None, :] for i in range(4))
            h = self.norm1(x) * (1 + scale_msa)
        else:
            h = self.norm1(x)
        q = inputs.apply_rope_interleaved(self.norm_q(self.to_q(h)), cos, sin)
        k = inputs.apply_rope_interleaved(self.norm_k(self.to_k(h)), cos, sin)
        v = self.to_v(h)
        q, k, v = (checkpoint_name(constrain(y, ("batch", "seq", "act_heads", None)), "qkv") for y in (q, k, v))
        ctx = checkpoint_name(attn_lib.attention(q, k, v, meta, meta, impl=impl, chunk=chunk), "attn_out")
        a = self.norm2(self.to_out(ctx))
        x = x + (jnp.tanh(gate_msa) * a if self.modulated else a)
        f_in = self.ffn_norm1(x) * (1 + scale_mlp) if self.modulated else self.ffn_norm1(x)
        f = self.ffn_norm2(self.feed_forward(f_in))
        x = x + (jnp.tanh(gate_mlp) * f if self.modulated else f)
        return constrain(x, ("batch", "seq", "act_embed"))


def _stack(c, n: int, modulated: bool, rngs, **kw):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(c, modulated, rngs=r, **kw)

    return make(rngs)


class NormOut(nnx.Module):
    """``LuminaLayerNormContinuous``: ``linear_2(LayerNorm(x)·(1 + linear_1(SiLU(temb))))``, eps 1e-6, no affine."""

    def __init__(self, c, *, dtype, param_dtype, rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=zeros_init)
        self.linear_1 = Dense(temb_dim(c), c.hidden_size, ("mlp", "embed"), **kw)
        self.linear_2 = Dense(c.hidden_size, patch_dim(c), ("embed", "latent"), **kw)

    def __call__(self, x, temb):
        scale = self.linear_1(jax.nn.silu(temb))[:, None, :]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)
        return self.linear_2(y * (1 + scale))


class OmniGen2DiT(nnx.Module):
    """The whole DiT. Parameter tree (the conversion table maps it to the diffusers names):
    ``x_embedder``, ``ref_image_patch_embedder``, ``image_index_embedding``, ``time_embedder.mlp_{0,2}``,
    ``caption_norm``, ``caption_proj``, stacked ``noise_refiner``, ``ref_image_refiner``,
    ``context_refiner``, ``layers`` (each ``to_{q,k,v,out}``, ``norm_{q,k}``, ``feed_forward.*``,
    ``norm1``, ``norm2``, ``ffn_norm1``, ``ffn_norm2``, ``modulation``), ``norm_out.linear_{1,2}``."""

    def __init__(self, c, *, rngs: nnx.Rngs):
        validate(c)
        self.cfg = c
        self.dtype = canonical_dtype(c.dtype)
        param_dtype = canonical_dtype(c.param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=param_dtype)
        h = c.hidden_size
        self.impl, self.chunk = c.attention_impl, int(c.attention_chunk)
        self.remat_policy = c.remat_policy
        remat(lambda x: x, self.remat_policy)  # validate the name now
        self.scan_layers = bool(c.scan_layers)
        self.rope_key = (tuple(int(d) for d in c.axes_dim_rope), tuple(int(n) for n in c.axes_lens), ROPE_THETA)
        with nnx.use_eager_sharding(False):
            self.x_embedder = Dense(patch_dim(c), h, ("latent", "embed"), use_bias=True, rngs=rngs, **kw)
            self.ref_image_patch_embedder = Dense(patch_dim(c), h, ("latent", "embed"), use_bias=True,
                                                  rngs=rngs, **kw)
            self.image_index_embedding = make_param(rngs, nnx.initializers.normal(0.02), (MAX_REF_IMAGES, h),
                                                    (None, "embed"), param_dtype)
            self.time_embedder = TimestepEmbedder(temb_dim(c), FREQ_DIM, scale=float(c.timestep_scale),
                                                  rngs=rngs, **kw)
            self.caption_norm = RMSNorm(c.text_feat_dim, c.norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.caption_proj = Dense(c.text_feat_dim, h, ("mlp", "embed"), use_bias=True, rngs=rngs, **kw)
            self.noise_refiner = _stack(c, c.num_refiner_layers, True, rngs, **kw)
            self.ref_image_refiner = _stack(c, c.num_refiner_layers, True, rngs, **kw)
            self.context_refiner = _stack(c, c.num_refiner_layers, False, rngs, **kw)
            self.layers = _stack(c, c.num_layers, True, rngs, **kw)
            self.norm_out = NormOut(c, rngs=rngs, **kw)

    # ---- pieces ----
    def _run_stack(self, stack, x, temb, cos, sin, meta):
        graphdef, state = nnx.split(stack)
        impl, chunk = self.impl, self.chunk

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, temb, cos, sin, meta, impl=impl, chunk=chunk), None

        body = remat(body, self.remat_policy)
        if self.scan_layers:
            return jax.lax.scan(body, x, state)[0]
        n = jax.tree.leaves(state)[0].shape[0]
        for i in range(n):
            x, _ = body(x, jax.tree.map(lambda a: a[i], state))
        return x

    def _rope(self, ids):
        return inputs.rope_cos_sin(ids, inputs.rope_tables(*self.rope_key))

    @staticmethod
    def _meta(valid):
        """All valid tokens see each other (one document, full attention); padding sees nothing."""
        doc = jnp.where(valid, 0, -1).astype(jnp.int32)
        zeros = jnp.zeros_like(doc)
        return TokenMeta(doc, zeros, jnp.full_like(doc, FULL), zeros)

    def embed_time(self, t):
        return self.time_embedder(t)

    # ---- forward ----
    def __call__(self, x_tokens, x_hw, t, text, text_mask, ref_tokens=None, ref_hw=None):
        """Velocity of the target tokens.

        Args:
          x_tokens: ``[B, N, p·p·C]`` noisy target tokens (``omnigen2_inputs.pack_latents``), ``x_hw [B, 2]``
            their token grids (row-major, padding after ``h·w``).
          t: ``[B]`` times in [0, 1], t = 1 is data (the caller rounds to bf16 as the official code does).
          text: ``[B, L, text_feat_dim]`` MLLM hidden states, ``text_mask [B, L]`` (``mllm_condition``).
          ref_tokens: optional ``[B, R, M, p·p·C]`` reference latents, ``ref_hw [B, R, 2]`` (``(0, 0)`` = absent).
        Returns:
          ``[B, N, p·p·C]`` fp32 velocity (x₁ − x₀ direction); padding rows are not meaningful.
        """
        c = self.cfg
        b, n, _ = x_tokens.shape
        l = text.shape[1]
        r = m = 0
        if ref_tokens is not None:
            _, r, m, _ = ref_tokens.shape
            if r > MAX_REF_IMAGES:
                raise ValueError(f"{r} reference-image slots; OmniGen2 has {MAX_REF_IMAGES} image index embeddings")
        if l > min(c.axes_lens):  # text ids are (n, n, n); images are checked on the host (check_rope_range)
            raise ValueError(f"text length {l} exceeds the rotary tables (axes_lens {tuple(c.axes_lens)}); "
                             f"clip the condition with mllm_condition(max_len=...)")
        text_mask = text_mask.astype(bool)
        text_ids, ref_ids, x_ids = inputs.omni_rope_ids(text_mask, x_hw, n, ref_hw, m)
        _, _, x_valid = inputs.grid_ids(x_hw, n)

        temb = self.embed_time(t)
        cap = self.caption_proj(self.caption_norm(text.astype(self.dtype)))
        cap_cos, cap_sin = self._rope(text_ids)
        cap = self._run_stack(self.context_refiner, cap, None, cap_cos, cap_sin, self._meta(text_mask))

        x = self.x_embedder(x_tokens)
        x_cos, x_sin = self._rope(x_ids)
        x = self._run_stack(self.noise_refiner, x, temb, x_cos, x_sin, self._meta(x_valid))

        parts, cos, sin, valid = [cap], [cap_cos], [cap_sin], [text_mask]
        if ref_tokens is not None:
            _, _, ref_valid = inputs.grid_ids(ref_hw, m)  # [B, R, M]
            y = self.ref_image_patch_embedder(ref_tokens)
            y = y + self.image_index_embedding[...][:r].astype(y.dtype)[None, :, None, :]
            r_cos, r_sin = self._rope(ref_ids)
            flat = lambda a: a.reshape((b * r,) + a.shape[2:])  # noqa: E731  one row per image
            y = self._run_stack(self.ref_image_refiner, flat(y), jnp.repeat(temb, r, axis=0), flat(r_cos),
                                flat(r_sin), self._meta(flat(ref_valid)))
            parts.append(y.reshape(b, r * m, -1))
            cos.append(r_cos.reshape(b, r * m, -1))
            sin.append(r_sin.reshape(b, r * m, -1))
            valid.append(ref_valid.reshape(b, r * m))
        parts.append(x), cos.append(x_cos), sin.append(x_sin), valid.append(x_valid)

        joint = constrain(jnp.concatenate(parts, axis=1), ("batch", "seq", "act_embed"))
        joint = self._run_stack(self.layers, joint, temb, jnp.concatenate(cos, axis=1),
                                jnp.concatenate(sin, axis=1), self._meta(jnp.concatenate(valid, axis=1)))
        out = self.norm_out(joint[:, -n:], temb)
        return out.astype(jnp.float32)

    def forward_latents(self, x, t, text, text_mask, refs=None):
        """Convenience for a batch of same-size NHWC target latents ``[B, H, W, C]``; ``refs`` as in
        ``__call__`` (already packed) or None. Returns the velocity ``[B, H, W, C]`` fp32."""
        from sgt_jax.models.flux_vae import patchify_latent, unpatchify_latent

        p = self.cfg.patch_size
        b, hh, ww, _ = x.shape
        hw = jnp.broadcast_to(jnp.asarray([hh // p, ww // p], jnp.int32), (b, 2))
        ref_tokens, ref_hw = refs if refs is not None else (None, None)
        v = self(patchify_latent(x, p), hw, t, text, text_mask, ref_tokens, ref_hw)
        return unpatchify_latent(v, hh // p, ww // p, p)


def abstract_dit(c):
    """The model built abstractly (``nnx.eval_shape``): nothing allocated."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: OmniGen2DiT(c, rngs=nnx.Rngs(0)))


def count_params(c) -> int:
    state = nnx.state(abstract_dit(c), nnx.Param)
    return sum(int(a.size) for a in jax.tree.leaves(state))
