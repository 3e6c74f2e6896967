"""Mesh from config, logical rules, NNX state shardings, the replication check, global batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sgt_jax import parallel


def _mesh_cfg(shape, axes=("data", "fsdp", "tensor")):
    import ml_collections

    return ml_collections.ConfigDict(dict(axes=axes, shape=shape))


def test_resolve_mesh_shape_fills_and_rejects():
    assert parallel.resolve_mesh_shape(("a", "b"), (2, -1), 8) == (2, 4)
    assert parallel.resolve_mesh_shape(("a", "b"), (1, 1), 1) == (1, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.resolve_mesh_shape(("a", "b"), (-1, -1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        parallel.resolve_mesh_shape(("a", "b"), (3, -1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        parallel.resolve_mesh_shape(("a", "b"), (2, 2), 8)
    with pytest.raises(ValueError, match="differ in length"):
        parallel.resolve_mesh_shape(("a",), (2, 2), 4)


def test_logical_rules_validate(tiny_config):
    rules = parallel.logical_rules(tiny_config)
    assert ("batch", ("data", "fsdp")) in rules
    tiny_config.mesh.rules = (("embed", "fsdpp"),)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.logical_rules(tiny_config)


@pytest.mark.multidevice
def test_logical_to_spec_first_usable_rule(tiny_config):
    mesh = parallel.make_mesh(_mesh_cfg((1, 4, 2)))
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    rules = parallel.logical_rules(tiny_config)
    spec = parallel.logical_to_spec
    assert spec(("embed", "mlp"), (64, 128), rules, mesh) == P("fsdp", "tensor")
    # vocab takes tensor first; embed then gets fsdp.
    assert spec(("vocab", "embed"), (512, 64), rules, mesh) == P("tensor", "fsdp")
    # mlp alone: tensor first; a dim not divisible by tensor falls back to fsdp, then to replicated.
    assert spec(("mlp",), (12,), rules, mesh) == P("tensor")
    assert spec(("mlp",), (4,), rules, mesh) == P("tensor")
    assert spec(("mlp",), (3,), rules, mesh) == P()
    assert spec(("layers", "embed", "mlp"), (2, 64, 6), rules, mesh) == P(None, "fsdp", "tensor")
    assert spec(None, (3,), rules, mesh) == P()
    with pytest.raises(ValueError, match="no entry in config.mesh.rules"):
        spec(("nonsense",), (8,), rules, mesh)


class _Toy(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.normal(1.0)
        self.w = nnx.Param(init(rngs.params(), (64, 128)), out_sharding=("embed", "mlp"))
        self.emb = nnx.Param(init(rngs.params(), (512, 64)), out_sharding=("vocab", "embed"))
        self.scale = nnx.Param(jnp.ones((64,)), out_sharding=("norm",))


@pytest.mark.multidevice
def test_init_sharded_matches_unsharded_and_check(tiny_config):
    mesh = parallel.make_mesh(_mesh_cfg((2, 4, 1)))
    rules = parallel.logical_rules(tiny_config)
    build = lambda: _Toy(nnx.Rngs(0))  # noqa: E731
    graphdef, abstract, shardings = parallel.abstract_state_with_shardings(build, mesh, rules, nnx.Param)
    assert abstract["w"].value.sharding.spec == P("fsdp", "tensor")
    _, state = parallel.init_sharded(build, mesh, rules, nnx.Param)
    assert state["emb"].value.sharding.spec == abstract["emb"].value.sharding.spec
    with nnx.use_eager_sharding(False):
        ref = nnx.state(build(), nnx.Param)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    frac, worst = parallel.replicated_fraction(state)
    assert worst[0][0].startswith("['scale']") and frac == pytest.approx(64 / (64 * 128 + 512 * 64 + 64))
    parallel.check_sufficiently_sharded(state, mesh, rules, tolerance=0.02)
    with pytest.raises(RuntimeError, match="fully replicated"):
        parallel.check_sufficiently_sharded(state, mesh, rules, tolerance=0.0001)


@pytest.mark.multidevice
def test_to_global_places_rows(tiny_config):
    mesh = parallel.make_mesh(_mesh_cfg((2, 4, 1)))
    rules = parallel.logical_rules(tiny_config)
    host = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3), "n_seg": np.ones(8, np.int32)}
    g = parallel.to_global(host, mesh, rules)
    assert set(g) == {"tokens"}
    assert g["tokens"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(g["tokens"]), host["tokens"])
    with pytest.raises(ValueError, match="not divisible"):
        parallel.to_global({"tokens": host["tokens"][:6]}, mesh, rules)


def test_platform_and_distributed_settings(tiny_config, monkeypatch):
    tiny_config.train.platform = "any"
    assert parallel.check_platform(tiny_config) == jax.default_backend()
    tiny_config.train.platform = "tpu"
    if jax.default_backend() != "tpu":
        with pytest.raises(RuntimeError, match="config.train.platform is 'tpu'"):
            parallel.check_platform(tiny_config)
    assert parallel.distributed_settings(tiny_config) is None
    monkeypatch.setenv("SGT_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(ValueError, match="needs all three"):
        parallel.distributed_settings(tiny_config)
    monkeypatch.setenv("SGT_NUM_PROCESSES", "2")
    monkeypatch.setenv("SGT_PROCESS_ID", "1")
    assert parallel.distributed_settings(tiny_config) == dict(
        coordinator_address="localhost:1234", num_processes=2, process_id=1)
