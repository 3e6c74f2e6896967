"""The device mesh and the logical-axis rules table, both read from the config.

Why one place: every sharding in sgt_jax (parameters, optimizer state, EMA, batches, activation
constraints) is derived from ``config.mesh`` through the two functions here, so changing the
parallelism of a run is a config edit, never a code edit.

* ``make_mesh(config.mesh)`` builds a ``jax.sharding.Mesh`` with ``AxisType.Auto`` axes (Flax's logical
  constraints and embedding gathers fail under Explicit axes, which ``jax.make_mesh`` now defaults to); a ``-1`` entry in
  ``mesh.shape`` takes the devices left over by the others.
* ``logical_rules(config)`` returns the ordered ``(logical_name, mesh_axes)`` table. A logical name may
  appear several times: ``logical_to_spec`` takes the first entry whose mesh axes are still unused in
  that array's spec *and* divide the dimension, so one table serves the 7B model on a pod and the tiny
  model on 8 fake CPU devices (a dimension that does not divide is left replicated instead of failing).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]

# Logical names of the batch dimension of every batch array (docs/interfaces.md §3).
BATCH = "batch"


def resolve_mesh_shape(axes: Sequence[str], shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill a single -1 in ``shape`` so that the product equals ``num_devices``; check everything else."""
    axes, shape = tuple(axes), tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"config.mesh.axes {axes} and config.mesh.shape {shape} differ in length")
    if len(set(axes)) != len(axes):
        raise ValueError(f"config.mesh.axes has duplicates: {axes}")
    fills = [i for i, s in enumerate(shape) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"config.mesh.shape {shape}: at most one -1 allowed")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh.shape {shape}: sizes must be positive or -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if fills:
        if num_devices % known:
            raise ValueError(
                f"config.mesh.shape {shape}: {num_devices} devices are not divisible by the fixed axes "
                f"(product {known})")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"config.mesh.shape {shape} (axes {axes}) needs {int(np.prod(shape))} devices, have {num_devices}")
    return shape


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
    """Build the mesh described by ``config.mesh`` (axes, shape) over ``devices`` (default: all).

    ``devices`` may be abstract TPU devices from ``jax.experimental.topologies`` (AOT compile mode).
    ``mesh_utils.create_device_mesh`` orders physical devices so neighbouring mesh coordinates are
    neighbours on the interconnect (matters on TPU, harmless on CPU).
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(mesh_cfg.axes)
    shape = resolve_mesh_shape(axes, mesh_cfg.shape, len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as err:
        # Topologies create_device_mesh has no physical model for (e.g. odd CPU counts): row-major order.
        # Harmless on CPU; on a TPU it can put mesh neighbours far apart on the interconnect, so say so.
        if devices and getattr(devices[0], "platform", "cpu") != "cpu":
            logging.warning("mesh %s: no interconnect-aware device order (%s); using row-major order", shape, err)
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, axes, axis_types=(AxisType.Auto,) * len(axes))


def logical_rules(config) -> Rules:
    """The ordered ``(logical_name, mesh_axes)`` table from ``config.mesh.rules``, validated.

    ``mesh_axes`` is None (replicate), one mesh-axis name, or a tuple of names. Names not in
    ``config.mesh.axes`` are an error (a typo would otherwise silently replicate)."""
    mesh_cfg = config.mesh if hasattr(config, "mesh") else config
    if "rules" not in mesh_cfg:
        raise ValueError("config.mesh.rules is missing: it maps logical axis names to mesh axes")
    axes = set(mesh_cfg.axes)
    rules = []
    for entry in mesh_cfg.rules:
        if len(entry) != 2:
            raise ValueError(f"config.mesh.rules entry {entry!r} is not a (logical_name, mesh_axes) pair")
        name, target = entry
        if target is not None:
            targets = (target,) if isinstance(target, str) else tuple(target)
            unknown = [t for t in targets if t not in axes]
            if unknown:
                raise ValueError(
                    f"config.mesh.rules maps {name!r} to unknown mesh axes {unknown}; mesh axes are "
                    f"{sorted(axes)}")
            target = targets[0] if len(targets) == 1 else targets
        rules.append((str(name), target))
    return tuple(rules)


def _axis_size(mesh: Mesh, target) -> int:
    targets = (target,) if isinstance(target, str) else tuple(target)
    return int(np.prod([mesh.shape[t] for t in targets]))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None, rules: Rules,
                    mesh: Mesh) -> PartitionSpec:
    """Map one array's logical axis names to a PartitionSpec (first usable rule per name wins).

    A rule is usable when none of its mesh axes is already used by an earlier dimension of the same
    array and (if ``shape`` is given) its total size divides the dimension. ``None`` names replicate.
    Unknown names are an error: every logical name the model uses must appear in the table.
    """
    if names is None:
        return PartitionSpec()
    known = {n for n, _ in rules}
    used: set[str] = set()
    out = []
    for dim, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in known:
            raise ValueError(f"logical axis {name!r} has no entry in config.mesh.rules (known: {sorted(known)})")
        chosen = None
        for rule_name, target in rules:
            if rule_name != name:
                continue
            if target is None:
                break
            targets = (target,) if isinstance(target, str) else tuple(target)
            if used.intersection(targets):
                continue
            if shape is not None and shape[dim] % _axis_size(mesh, targets):
                continue
            chosen = target
            used.update(targets)
            break
        out.append(chosen)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, names, shape, rules: Rules, memory_kind: str | None = None) -> NamedSharding:
    spec = logical_to_spec(names, shape, rules, mesh)
    if memory_kind is None:
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, spec, memory_kind=memory_kind)


def batch_axes(mesh: Mesh, rules: Rules) -> Any:
    """The mesh axes the batch dimension is split over (the first ``batch`` rule; no divisibility test)."""
    for name, target in rules:
        if name == BATCH:
            return target
    raise ValueError("config.mesh.rules has no 'batch' entry; the batch dimension must map to mesh axes")


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
    """NamedSharding for a batch array: dim 0 over the batch axes, the rest replicated."""
    del ndim
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules)))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split (global batch must be a multiple of this)."""
    target = batch_axes(mesh, rules)
    return 1 if target is None else _axis_size(mesh, target)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules, mesh: Mesh) -> jax.Array:
    """``with_sharding_constraint`` by logical names: the one helper all activation constraints use."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, rules, mesh)))
