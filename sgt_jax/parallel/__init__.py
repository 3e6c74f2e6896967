"""Mesh, logical-axis rules, NNX state shardings, multi-process start-up and global batches.

Public API (used by train, checkpoint conversion, compile, sampling):
    make_mesh(config.mesh, devices=None) -> Mesh
    logical_rules(config) -> tuple of (logical_name, mesh_axes)
    logical_to_spec(names, shape, rules, mesh) -> PartitionSpec
    constrain(x, names, rules, mesh)                       activation sharding constraint
    state_shardings(state, mesh, rules)                    nnx.State -> same tree of NamedShardings
    abstract_state_with_shardings(build_fn, mesh, rules, *filters) -> (graphdef, abstract, shardings)
    abstract_params_of(build_fn, mesh=None, rules=()) -> param pure dict of (sharded) ShapeDtypeStructs
    init_sharded(build_fn, mesh, rules, *filters) -> (graphdef, state)
    check_sufficiently_sharded(tree, mesh, rules, tolerance)
    maybe_initialize(config), check_platform(config)
    to_global(host_batch, mesh, rules), batch_sharding(mesh, rules)
"""

from sgt_jax.parallel.distributed import check_platform, distributed_settings, maybe_initialize
from sgt_jax.parallel.global_batch import DEVICE_KEYS, device_part, global_batch_shapes, to_global
from sgt_jax.parallel.mesh import (
    batch_axes,
    batch_sharding,
    batch_shards,
    constrain,
    logical_rules,
    logical_to_spec,
    make_mesh,
    named_sharding,
    resolve_mesh_shape,
)
from sgt_jax.parallel.sharding import (
    abstract_params_of,
    abstract_state_with_shardings,
    abstract_with_shardings,
    check_sufficiently_sharded,
    init_sharded,
    replicated_fraction,
    state_shardings,
    variable_logical_names,
)

__all__ = [
    "DEVICE_KEYS", "abstract_params_of", "abstract_state_with_shardings", "abstract_with_shardings", "batch_axes", "batch_sharding",
    "batch_shards", "check_platform", "check_sufficiently_sharded", "constrain", "device_part",
    "distributed_settings", "global_batch_shapes", "init_sharded", "logical_rules", "logical_to_spec",
    "make_mesh", "maybe_initialize", "named_sharding", "replicated_fraction", "resolve_mesh_shape",
    "state_shardings", "to_global", "variable_logical_names",
]
