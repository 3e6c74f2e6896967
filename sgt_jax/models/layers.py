"""Small building blocks shared by the BAGEL model: parameters with logical axis names, Dense, Embed,
RMSNorm, SwiGLU MLP, rotate-half RoPE and tanh-GELU (Qwen2, transformers `models/qwen2/modeling_qwen2.py`).

Why our own Dense instead of ``nnx.Linear``: attention projections keep the head axes as real array
axes (kernel ``(embed, q_heads, head_dim)``), so the rules table can shard heads without reshapes, and
every parameter is created through one helper that attaches logical names (docs/interfaces.md §3).

Parameters are created with ``eager_sharding=False``: a module can be built (or ``nnx.eval_shape``-d)
without a mesh; placement is decided later by ``jit(out_shardings=...)`` from the logical names.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Initializer = Callable[..., jax.Array]


_ACTIVATION_CONSTRAINT = contextvars.ContextVar("sgt_activation_constraint", default=None)
_KERNEL_MESH = contextvars.ContextVar("sgt_kernel_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(fn: Callable[[jax.Array, tuple], jax.Array]):
    """Within this context (at trace time), model activations are passed through ``fn(x, names)``.

    ``names`` are logical activation names (``batch, seq, act_embed, act_heads, act_mlp, act_vocab``,
    or None), one per axis of x. The train step passes e.g.
    ``lambda x, n: sgt_jax.parallel.mesh.constrain(x, n, rules, mesh)``; outside the context the
    model adds no constraints (single device, tests)."""
    token = _ACTIVATION_CONSTRAINT.set(fn)
    try:
        yield
    finally:
        _ACTIVATION_CONSTRAINT.reset(token)


@contextlib.contextmanager
def sharded_kernels(mesh, spec_of: Callable[[tuple, tuple], Any]):
    """Within this context (at trace time), Pallas kernels run under ``shard_map`` over ``mesh``;
    ``spec_of(names, shape)`` maps logical activation names to a PartitionSpec (the train step passes
    ``sgt_jax.parallel.logical_to_spec`` with its rules). Outside it kernels see whole arrays."""
    token = _KERNEL_MESH.set((mesh, spec_of))
    try:
        yield
    finally:
        _KERNEL_MESH.reset(token)


def kernel_sharding():
    """``(mesh, spec_of)`` set by ``sharded_kernels``, or None."""
    return _KERNEL_MESH.get()


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """Apply the active activation-sharding hook (identity when none is set)."""
    fn = _ACTIVATION_CONSTRAINT.get()
    if fn is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"activation names {names} do not match the rank of shape {x.shape}")
    return fn(x, tuple(names))


def canonical_dtype(name_or_dtype) -> jnp.dtype:
    """Config dtype string ('float32', 'bfloat16', ...) -> jnp dtype, with a clear error."""
    try:
        return jnp.dtype(name_or_dtype)
    except TypeError as err:
        raise ValueError(f"unknown dtype {name_or_dtype!r} (use e.g. 'float32' or 'bfloat16')") from err


def make_param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
               param_dtype) -> nnx.Param:
    """An ``nnx.Param`` of ``shape`` with logical axis ``names`` (one per dimension)."""
    shape = tuple(int(s) for s in shape)
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match the rank of shape {shape}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = init(key, shape, param_dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def fan_in_init(n_in: int, n_out: int) -> Initializer:
    """LeCun-normal over the first ``n_in`` (input) axes; used only for random (test) init."""
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
    )


class Dense(nnx.Module):
    """``y = x · kernel (+ bias)``, contracting the last ``len(in_features)`` axes of x.

    kernel shape ``in_features + out_features`` with logical ``names`` (one per kernel axis); bias shape
    ``out_features`` with the output names. Inputs are cast to the compute ``dtype``; the kernel is stored
    in ``param_dtype`` and cast at the matmul (fp32 master weights, bf16 compute).
    """

    def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int],
                 names: Sequence[str | None], *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
                 kernel_init: Initializer | None = None, bias_init: Initializer = zeros_init):
        in_f = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        out_f = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.n_in = len(in_f)
        self.dtype = canonical_dtype(dtype)
        kernel_init = kernel_init or fan_in_init(len(in_f), len(out_f))
        self.kernel = make_param(rngs, kernel_init, in_f + out_f, names, canonical_dtype(param_dtype))
        self.bias = (make_param(rngs, bias_init, out_f, tuple(names)[len(in_f):], canonical_dtype(param_dtype))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        n = self.n_in
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel,
            ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``(vocab, embed)``; lookup returns the compute dtype."""

    def __init__(self, num: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = canonical_dtype(dtype)
        self.embedding = make_param(rngs, nnx.initializers.normal(0.02), (num, features), ("vocab", "embed"),
                                    canonical_dtype(param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: statistics in fp32, cast back to the input dtype, THEN multiply by the weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs | None = None):
        self.eps = float(eps)
        self.scale = make_param(rngs, ones_init, (dim,), ("norm",), canonical_dtype(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


class SwiGLU(nnx.Module):
    """Qwen2 MLP: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(hidden, intermediate, ("embed", "mlp"), **kw)
        self.up_proj = Dense(hidden, intermediate, ("embed", "mlp"), **kw)
        self.down_proj = Dense(intermediate, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        # tagged for the remat policies that save or offload the MLP's gate/up outputs (sgt_jax/models/remat.py)
        gate, up = checkpoint_name(self.gate_proj(x), "mlp_gate"), checkpoint_name(self.up_proj(x), "mlp_up")
        hidden = jax.nn.silu(gate) * up
        if hidden.ndim == 3:
            hidden = constrain(hidden, ("batch", "seq", "act_mlp"))
        return self.down_proj(hidden)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """``gelu_pytorch_tanh`` (the tanh approximation)."""
    return jax.nn.gelu(x, approximate=True)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``theta^(-2k/head_dim)``, k = 0..head_dim/2-1, computed in fp32 like the PyTorch reference."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """fp32 ``cos, sin`` of shape ``positions.shape + (head_dim,)`` (frequencies duplicated [f, f])."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x [B, T, heads, D]`` with ``cos/sin [B, T, D]`` (cast to x's dtype)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def stacked(num: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """``num`` layers built by ``make(rngs)`` with their parameters stacked on a leading ``layers`` axis
    (independent random init per layer), ready for ``jax.lax.scan`` over ``nnx.split(...)``'s state."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)
