"""BAGEL's fixed 2-D sin-cos position embeddings and the DiT timestep embedding (ByteDance-Seed/Bagel
``modeling/bagel/modeling_utils.py``: ``PositionEmbedding``, ``TimestepEmbedder``).

The sin-cos tables (``vit_pos_embed`` 70²×H, ``latent_pos_embed`` 64²×H) are NOT parameters here:
every row depends only on (row, col), so we gather the rows we need from a small per-axis table
(``grid × H/2``, computed in float64 like the official one and stored as a constant). That saves 32M
parameters of optimizer state and HBM and removes a tensor that the official training loader drops
anyway. ``sincos_2d_table_np`` rebuilds the full table in float64 for the exporter.

Values: ``table_dtype`` float32 gives the official trainer's table (float64 math stored as fp32);
bfloat16 gives the bf16 copies in a BAGEL folder's ``ema.safetensors``, which the official inference
code (``app.py``, ``inferencer.py``) loads and uses (``model.pos_table_dtype``; the two differ by bf16's
rounding, at most 2^-9 relative per value).

Layout (the subtle part): for flat id ``r*G + c`` the vector is ``concat(E(c), E(r))`` (column in the
first half), and ``E(x) = concat(sin(x·ω), cos(x·ω))`` (sin first), ``ω_k = 10000^(-k/(d/2))``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models.layers import Dense


def _check_dim(dim: int) -> None:
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")


def _omega_np(dim: int) -> np.ndarray:
    """The dim/4 frequencies of one axis, float64."""
    half = dim // 2
    return 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))


def sincos_2d_table_np(grid: int, dim: int) -> np.ndarray:
    """The full ``(grid², dim)`` float64 table exactly as BAGEL's ``PositionEmbedding`` fills it."""
    _check_dim(dim)
    idx = np.arange(grid * grid)
    row, col = idx // grid, idx % grid
    omega = _omega_np(dim)

    def one_axis(x):
        ang = x[:, None].astype(np.float64) * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    return np.concatenate([one_axis(col), one_axis(row)], axis=1)


def sincos_2d(pos_ids: jax.Array, grid: int, dim: int, table_dtype=jnp.float32) -> jax.Array:
    """Rows of the (grid², dim) table for integer ``pos_ids`` of any shape -> ``pos_ids.shape + (dim,)``, in
    ``table_dtype``: each value is the float64 formula rounded once to that dtype (see the module doc).

    Ids are taken modulo ``grid²`` per axis (BAGEL's lookup would fail outside ``[0, grid²)``), so callers
    must pass valid ids (pad rows use id 0).
    """
    _check_dim(dim)
    axis_table = sincos_2d_table_np(grid, dim)[:grid, : dim // 2]  # row 0: E(col) for col = 0..grid-1
    table = jnp.asarray(axis_table.astype(np.float32)).astype(table_dtype)
    return jnp.concatenate([table[pos_ids % grid], table[pos_ids // grid % grid]], axis=-1)


def timestep_frequencies(t: jax.Array, dim: int = 256, max_period: float = 10000.0, scale: float = 1.0) -> jax.Array:
    """DiT sinusoidal features ``concat(cos(a), sin(a))`` (cos first) with ``a = (t·f)·scale``.

    BAGEL: t in [0,1] and ``scale`` 1 (NOT ×1000). OmniGen2: ``scale`` 1000, applied after the product
    like diffusers' ``get_timestep_embedding`` (the order matters in fp32 at angles up to 1000 rad)."""
    if dim % 2:
        raise ValueError(f"timestep frequency dim must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    if scale != 1.0:
        args = args * jnp.float32(scale)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """``mlp_0: Linear(256 → H)`` → SiLU → ``mlp_2: Linear(H → H)`` on the timestep features.

    (BAGEL names: ``time_embedder.mlp.0`` / ``time_embedder.mlp.2``.)
    """

    def __init__(self, hidden: int, freq_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, scale: float = 1.0):
        self.freq_dim = int(freq_dim)
        self.scale = float(scale)
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_0 = Dense(freq_dim, hidden, (None, "mlp"), **kw)
        self.mlp_2 = Dense(hidden, hidden, ("mlp", "embed"), **kw)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_frequencies(t, self.freq_dim, scale=self.scale))))
