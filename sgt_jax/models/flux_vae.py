"""The FLUX.1 autoencoder (BAGEL's VAE), Flax NNX, NHWC.

What it computes (ByteDance-Seed/Bagel `modeling/autoencoder.py`): images in [-1, 1] -> encoder -> posterior statistics
(mean, logvar) with ``z_channels`` channels at 1/2^(levels-1) resolution; latents are *sampled*
(``mean + exp(logvar/2) * eps``) and mapped to model space by ``scale_factor * (z - shift_factor)``;
the decoder maps latents back to pixels.

Why this shape of code:
* Sub-module names mirror the FLUX/BAGEL PyTorch module tree (``encoder.down[i].block[j].norm1``,
  ``nin_shortcut``, ``downsample.conv``, ``mid.block_1``, ``mid.attn_1.{norm,q,k,v,proj_out}``,
  ``norm_out``, ``conv_out``; ``decoder.up[l]`` indexed by *resolution level*, so ``up[levels-1]``
  runs first) so ``ae.safetensors`` maps onto the parameter tree by renaming plus OIHW -> HWIO.
* NHWC throughout (the TPU-native conv layout); GroupNorm statistics in fp32 with the two-pass
  variance (``use_fast_variance=False``) to match torch.
* Downsample pads one zero row/column at the bottom/right and runs a VALID stride-2 3x3 conv; this is
  expressed as the conv's explicit padding ((0,1),(0,1)) (identical to pad-then-VALID).
* The VAE is always frozen. It is the separate submodule ``vae`` of Bagel: exclude it from the
  optimizer with the path filter ``FROZEN_VAE_FILTER`` (see docs/vision.md). No stop_gradient is
  inserted: gradients never flow into it unless a caller differentiates with respect to it.
* ``logvar`` is returned raw (FLUX does not clamp it; diffusers clamps to [-30, 20] inside its
  DiagonalGaussianDistribution, which never binds for trained weights).

Every parameter carries logical names and is created unplaced (``eager_sharding=False``); placement
comes from ``jit(out_shardings)`` through the rules table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgt_jax.models.layers import canonical_dtype

FROZEN_VAE_FILTER = nnx.PathContains("vae")
"""Matches every variable under a module attribute named ``vae`` (Bagel.vae): pass
``nnx.All(nnx.Param, nnx.Not(FROZEN_VAE_FILTER))`` as the optimizer's ``wrt``."""


def _named(init, names):
    """Initializer carrying logical axis names, unplaced (see sgt_jax/models/layers.py ``make_param``)."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def _conv(cin, cout, k, *, stride=1, padding=None, dtype, param_dtype, rngs):
    pad = padding if padding is not None else ((k // 2, k // 2), (k // 2, k // 2))
    return nnx.Conv(
        cin, cout, (k, k), strides=stride, padding=pad, dtype=dtype, param_dtype=param_dtype,
        kernel_init=_named(nnx.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")),
        bias_init=_named(nnx.initializers.zeros, ("conv_out",)),
        rngs=rngs,
    )


def _group_norm(c, groups, *, dtype, param_dtype, rngs):
    if c % groups:
        raise ValueError(f"vae channels {c} are not divisible by vae.num_groups {groups}")
    return nnx.GroupNorm(
        c, num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=_named(nnx.initializers.ones, ("norm",)),
        bias_init=_named(nnx.initializers.zeros, ("norm",)),
        rngs=rngs,
    )


class ResnetBlock(nnx.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, cin, cout, groups, **kw):
        self.norm1 = _group_norm(cin, groups, **kw)
        self.conv1 = _conv(cin, cout, 3, **kw)
        self.norm2 = _group_norm(cout, groups, **kw)
        self.conv2 = _conv(cout, cout, 3, **kw)
        if cin != cout:
            self.nin_shortcut = _conv(cin, cout, 1, **kw)
        self.has_shortcut = cin != cout

    def __call__(self, x):
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = self.conv2(jax.nn.swish(self.norm2(h)))
        return (self.nin_shortcut(x) if self.has_shortcut else x) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all h*w positions (1x1 convs q, k, v, proj_out), residual."""

    def __init__(self, c, groups, **kw):
        self.norm = _group_norm(c, groups, **kw)
        self.q = _conv(c, c, 1, **kw)
        self.k = _conv(c, c, 1, **kw)
        self.v = _conv(c, c, 1, **kw)
        self.proj_out = _conv(c, c, 1, **kw)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, h * w, 1, c) for f in (self.q, self.k, self.v))
        o = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(c)
        return x + self.proj_out(o.reshape(b, h, w, c))


class Downsample(nnx.Module):
    def __init__(self, c, **kw):
        self.conv = _conv(c, c, 3, stride=2, padding=((0, 1), (0, 1)), **kw)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, c, **kw):
        self.conv = _conv(c, c, 3, **kw)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level: ``block`` (list of ResnetBlocks) and an optional ``downsample``/``upsample``."""

    def __init__(self, blocks, *, downsample=None, upsample=None):
        self.block = nnx.List(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample
        self.has_down, self.has_up = downsample is not None, upsample is not None


class Mid(nnx.Module):
    def __init__(self, c, groups, **kw):
        self.block_1 = ResnetBlock(c, c, groups, **kw)
        self.attn_1 = AttnBlock(c, groups, **kw)
        self.block_2 = ResnetBlock(c, c, groups, **kw)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    def __init__(self, cfg, **kw):
        ch, mult, g = cfg.ch, tuple(cfg.ch_mult), cfg.num_groups
        self.conv_in = _conv(cfg.in_channels, ch, 3, **kw)
        in_mult = (1,) + mult
        levels = []
        for i, m in enumerate(mult):
            cin, cout = ch * in_mult[i], ch * m
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, g, **kw))
                cin = cout
            down = Downsample(cout, **kw) if i != len(mult) - 1 else None
            levels.append(Level(blocks, downsample=down))
        self.down = nnx.List(levels)
        c = ch * mult[-1]
        self.mid = Mid(c, g, **kw)
        self.norm_out = _group_norm(c, g, **kw)
        self.conv_out = _conv(c, 2 * cfg.z_channels, 3, **kw)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if level.has_down:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.swish(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg, **kw):
        ch, mult, g = cfg.ch, tuple(cfg.ch_mult), cfg.num_groups
        c = ch * mult[-1]
        self.conv_in = _conv(cfg.z_channels, c, 3, **kw)
        self.mid = Mid(c, g, **kw)
        levels = [None] * len(mult)
        cin = c
        for lvl in reversed(range(len(mult))):  # built (and run) from the lowest resolution up
            cout = ch * mult[lvl]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout, g, **kw))
                cin = cout
            up = Upsample(cout, **kw) if lvl != 0 else None
            levels[lvl] = Level(blocks, upsample=up)
        self.up = nnx.List(levels)  # up[l] = resolution level l
        self.norm_out = _group_norm(cin, g, **kw)
        self.conv_out = _conv(cin, cfg.out_channels, 3, **kw)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in reversed(range(len(self.up))):
            level = self.up[lvl]
            for blk in level.block:
                h = blk(h)
            if level.has_up:
                h = level.upsample(h)
        return self.conv_out(jax.nn.swish(self.norm_out(h)))


class FluxVAE(nnx.Module):
    """FLUX autoencoder. Images NHWC in [-1, 1]; latents NHWC with ``z_channels`` channels.

    Args:
      cfg_vae: ``config.model.vae`` (in_channels, out_channels, ch, ch_mult, num_res_blocks,
        z_channels, num_groups, scale_factor, shift_factor).
      dtype: compute dtype; param_dtype: storage dtype.
    """

    def __init__(self, cfg_vae, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        kw = dict(dtype=canonical_dtype(dtype), param_dtype=canonical_dtype(param_dtype), rngs=rngs)
        self.encoder = Encoder(cfg_vae, **kw)
        self.decoder = Decoder(cfg_vae, **kw)
        self.z_channels = int(cfg_vae.z_channels)
        self.scale_factor = float(cfg_vae.scale_factor)
        self.shift_factor = float(cfg_vae.shift_factor)
        self.downsample = 2 ** (len(cfg_vae.ch_mult) - 1)
        self.dtype = kw["dtype"]

    def encode_stats(self, x):
        """x [B,H,W,3] in [-1,1], H and W multiples of ``downsample`` -> (mean, logvar), each
        [B,H/d,W/d,z_channels] in fp32."""
        if x.ndim != 4 or x.shape[-1] != self.encoder.conv_in.in_features:
            raise ValueError(f"vae input must be NHWC with {self.encoder.conv_in.in_features} channels, got {x.shape}")
        if x.shape[1] % self.downsample or x.shape[2] % self.downsample:
            raise ValueError(f"vae input sides {x.shape[1:3]} must be multiples of {self.downsample}")
        h = self.encoder(x).astype(jnp.float32)
        return h[..., : self.z_channels], h[..., self.z_channels:]

    @staticmethod
    def sample(mean, logvar, rng):
        """Reparameterised posterior sample ``mean + exp(logvar/2) * N(0, 1)`` (BAGEL samples, also at inference)."""
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

    def scale(self, z):
        """Raw latent -> model space: ``scale_factor * (z - shift_factor)``."""
        return self.scale_factor * (z - self.shift_factor)

    def unscale(self, z):
        """Model space -> raw latent: ``z / scale_factor + shift_factor``."""
        return z / self.scale_factor + self.shift_factor

    def encode(self, x, rng):
        """FLUX/BAGEL ``encode``: sample the posterior, then scale. Returns model-space latents."""
        return self.scale(self.sample(*self.encode_stats(x), rng))

    def decode(self, z):
        """Raw (unscaled) latent [B,h,w,z_channels] -> image [B,h*d,w*d,3] (like diffusers' ``decode``)."""
        if z.ndim != 4 or z.shape[-1] != self.z_channels:
            raise ValueError(f"vae latents must be NHWC with {self.z_channels} channels, got {z.shape}")
        return self.decoder(z)

    def decode_scaled(self, z):
        """FLUX/BAGEL ``decode``: model-space latent -> unscale -> decoder."""
        return self.decode(self.unscale(z))


def patchify_latent(z, p: int):
    """[B,H,W,C] latent -> [B,(H/p)*(W/p),p*p*C] tokens, row-major; vector order (pr, pc, c), c fastest.

    Works on numpy and jax arrays alike (host data code and the model both use it).
    """
    b, h, w, c = z.shape
    if h % p or w % p:
        raise ValueError(f"latent sides {h}x{w} must be multiples of the latent patch size {p}")
    z = z.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify_latent(x, h: int, w: int, p: int):
    """Inverse of ``patchify_latent``: [B,h*w,p*p*C] with an h x w token grid -> [B,h*p,w*p,C]."""
    b, n, d = x.shape
    if n != h * w or d % (p * p):
        raise ValueError(f"latent tokens {x.shape} do not form a {h}x{w} grid of {p}x{p} patches")
    c = d // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def make_stats_encoder(vae: FluxVAE, latent_patch_size: int, devices=None):
    """``images [B,H,W,3] in [-1,1] -> (mean, logvar)`` patchified to [B, h·w, p·p·zc], as numpy (what the
    latent cache stores, sgt_jax/data/latent_cache.py).

    Data parallel over ``devices`` (default: this process's local devices): the weights are replicated, the
    batch is split along its first axis (padded with zero images to a multiple of the device count; the pad
    rows are dropped). jit-compiled once per image size."""
    devices = list(devices if devices is not None else jax.local_devices())
    mesh = Mesh(np.array(devices), ("batch",))
    rows, replicated = NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())
    graphdef, state = nnx.split(vae)
    state = jax.device_put(state, replicated)

    @jax.jit
    def encode(st, x):
        mean, logvar = nnx.merge(graphdef, st).encode_stats(x)
        return patchify_latent(mean, latent_patch_size), patchify_latent(logvar, latent_patch_size)

    def run(x: np.ndarray):
        b = x.shape[0]
        pad = -b % len(devices)
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        mean, logvar = encode(state, jax.device_put(x, rows))
        return np.asarray(mean)[:b], np.asarray(logvar)[:b]

    return run
