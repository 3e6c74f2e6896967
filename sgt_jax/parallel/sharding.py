"""Shardings for Flax NNX state: from logical axis names on each Variable to NamedShardings on the mesh.

Why: no process may ever hold the full model. The pattern (as in MaxText, AI-Hypercomputer/maxtext) is
  1. build the module abstractly (``nnx.eval_shape`` with eager sharding off: nothing is allocated),
  2. read each Variable's logical names (``out_sharding`` metadata) and map them through the rules table,
  3. materialise with ``jax.jit(init, out_shardings=...)`` (each device computes only its own shard) or
     restore from a checkpoint straight into those shardings (abstract ShapeDtypeStruct targets).

The conversion engineer shards imported weights with ``abstract_state_with_shardings``; the train step
uses ``state_shardings`` for its in/out shardings; ``replicated_fraction`` backs the startup check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgt_jax.parallel.mesh import Rules, logical_to_spec

# Metadata keys Flax has used for logical names (0.12: out_sharding; older: sharding_names, sharding).
_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_logical_names(var: nnx.Variable) -> tuple | None:
    """The logical axis names recorded on a Variable, or None if it has none."""
    meta = var.get_metadata()
    for key in _NAME_KEYS:
        names = meta.get(key)
        if names is not None and not isinstance(names, (NamedSharding, PartitionSpec)):
            return tuple(names)
    return None


def _value_shape(value) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules, memory_kind: str | None = None) -> NamedSharding:
    names = variable_logical_names(var)
    shape = _value_shape(var.get_value() if hasattr(var, "get_value") else var.value)
    if names is not None and len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match the variable's shape {shape}")
    spec = logical_to_spec(names, shape, rules, mesh)
    return NamedSharding(mesh, spec) if memory_kind is None else NamedSharding(mesh, spec, memory_kind=memory_kind)


def state_shardings(state: Any, mesh: Mesh, rules: Rules, memory_kind: str | None = None) -> Any:
    """A tree with ``state``'s structure whose Variables hold NamedShardings instead of values.

    Works for an ``nnx.State`` and for any pytree containing Variables (e.g. optax states built over
    an nnx.State: Adam moments keep the Variables' metadata, so they shard exactly like the params)."""

    def one(x):
        if _is_var(x):
            return x.replace(variable_sharding(x, mesh, rules, memory_kind))
        if hasattr(x, "shape") and hasattr(x, "dtype"):  # plain array leaf (e.g. a step counter): replicate
            return NamedSharding(mesh, PartitionSpec()) if memory_kind is None else NamedSharding(
                mesh, PartitionSpec(), memory_kind=memory_kind)
        return x

    return jax.tree.map(one, state, is_leaf=_is_var)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (the restore/compile target for ``tree``)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_state_with_shardings(build_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Rules,
                                  *filters) -> tuple[nnx.GraphDef, Any, Any]:
    """Build ``build_fn()`` abstractly and return ``(graphdef, abstract_state, shardings)``.

    ``abstract_state`` has ShapeDtypeStruct values that carry their NamedSharding, ready to be a
    restore target (Orbax) or an AOT-compile argument. ``filters`` are passed to ``nnx.split`` (e.g.
    ``nnx.Param``); with several filters the states come back as tuples.
    """
    with nnx.use_eager_sharding(False):
        abstract_module = nnx.eval_shape(build_fn)
    graphdef, *states = nnx.split(abstract_module, *filters)
    shardings = [state_shardings(s, mesh, rules) for s in states]
    abstract = [abstract_with_shardings(s, sh) for s, sh in zip(states, shardings)]
    if len(states) == 1:
        return graphdef, abstract[0], shardings[0]
    return graphdef, tuple(abstract), tuple(shardings)


def init_sharded(build_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Rules, *filters) -> tuple[nnx.GraphDef, Any]:
    """Materialise ``build_fn()`` directly in its shardings: each device computes only its own shard."""
    graphdef, _, shardings = abstract_state_with_shardings(build_fn, mesh, rules, *filters)

    def init():
        with nnx.use_eager_sharding(False):
            module = build_fn()
        _, *states = nnx.split(module, *filters)
        return states[0] if len(states) == 1 else tuple(states)

    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state


def param_axes(mesh: Mesh, rules: Rules) -> set[str]:
    """Mesh axes over which parameters are meant to be split: all axes any non-batch rule uses."""
    axes: set[str] = set()
    for name, target in rules:
        if target is None or name.startswith("act_") or name in ("batch", "seq"):
            continue
        axes.update((target,) if isinstance(target, str) else target)
    return {a for a in axes if mesh.shape.get(a, 1) > 1}


def replicated_fraction(tree: Any) -> tuple[float, list[tuple[str, int]]]:
    """Fraction of bytes in ``tree`` (arrays or ShapeDtypeStructs with shardings) that are fully
    replicated, and the largest replicated entries (path, bytes) for the error message."""
    total = 0
    replicated = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            continue
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        if sharding.is_fully_replicated:
            replicated.append((jax.tree_util.keystr(path), nbytes))
    if total == 0:
        return 0.0, []
    replicated.sort(key=lambda x: -x[1])
    return sum(b for _, b in replicated) / total, replicated


def check_sufficiently_sharded(tree: Any, mesh: Mesh, rules: Rules, tolerance: float) -> float:
    """Fail loudly if more than ``tolerance`` of the parameter bytes are replicated.

    Skipped (returns 0) when no mesh axis used for parameters has more than one device: then every
    parameter is replicated by design (single device, or pure data parallelism)."""
    if not param_axes(mesh, rules):
        return 0.0
    frac, worst = replicated_fraction(tree)
    if frac > tolerance:
        top = ", ".join(f"{p} ({b / 2**20:.2f} MiB)" for p, b in worst[:8])
        raise RuntimeError(
            f"{frac:.1%} of parameter bytes are fully replicated on mesh {dict(mesh.shape)} (tolerance "
            f"{tolerance:.1%}, config.mesh.max_replicated_fraction). Largest replicated: {top}. Check the "
            f"logical names on these parameters and config.mesh.rules.")
    return frac
