"""The vision modules under the config's logical rules on 8 fake CPU devices (data 1 x fsdp 4 x tensor 2).

Checks that the logical names actually shard the big parameters (ViT heads over ``tensor``, embed and
conv outputs over ``fsdp``) and that the sharded forward equals the single-device forward.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sgt_jax.checkpoint import vision_tables as vt, vit_table
from sgt_jax.models.flux_vae import FluxVAE
from sgt_jax.models.siglip_navit import SiglipNaViT
from sgt_jax.parallel.mesh import logical_rules, make_mesh
from sgt_jax.parallel.sharding import state_shardings


def _params(which, c):
    rng = np.random.default_rng(0)
    shapes = vit_table.vit_torch_shapes(c) if which == "vit" else vt.vae_torch_shapes(c)
    sd = {k: (rng.normal(size=s) / np.sqrt(np.prod(s[1:])) if len(s) > 1 else 1.0 + 0.1 * rng.normal(size=s))
          .astype(np.float32) for k, s in shapes.items()}
    return vit_table.vit_state_dict_to_params(sd, c) if which == "vit" else vt.vae_state_dict_to_params(sd, c)


@pytest.mark.multidevice
@pytest.mark.parametrize("which", ["vit", "vae"])
def test_vision_shards_and_matches_single_device(tiny_config, which):
    c = tiny_config.model[which]
    mesh = make_mesh(ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(1, 4, 2))))
    rules = logical_rules(tiny_config)
    cls = SiglipNaViT if which == "vit" else FluxVAE
    graphdef, state, rest = nnx.split(nnx.eval_shape(lambda: cls(c, rngs=nnx.Rngs(0))), nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, _params(which, c)))
    shardings = state_shardings(state, mesh, rules)
    sharded = jax.tree.map(lambda v, s: jax.device_put(v, s), state, shardings)

    specs = {".".join(map(str, k)): tuple(v[...].sharding.spec) + (None,) * (v[...].ndim - len(v[...].sharding.spec))
             for k, v in nnx.to_flat_state(sharded)}
    if which == "vit":
        assert specs["layers.self_attn.q_proj.kernel"] == (None, "fsdp", "tensor", None)
        assert specs["layers.mlp.fc1.kernel"] == (None, "fsdp", "tensor")
        rng = np.random.default_rng(1)
        args = (jnp.asarray(rng.normal(size=(2, 12, 3 * c.patch_size ** 2)), jnp.float32),
                jnp.asarray(np.tile(np.arange(12), (2, 1)), jnp.int32),
                jnp.asarray([[0] * 5 + [1] * 7, [3] * 9 + [-1] * 3], jnp.int32))
        run = lambda st, *a: nnx.merge(graphdef, st, rest)(*a)  # noqa: E731
    else:
        assert specs["encoder.conv_in.kernel"] == (None, None, None, "fsdp")
        args = (jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32),)
        run = lambda st, x: (lambda m: m.decode(m.encode_stats(x)[0]))(nnx.merge(graphdef, st, rest))  # noqa: E731
    got = jax.jit(run)(sharded, *args)
    want = jax.jit(run)(jax.device_put(state, jax.devices()[0]), *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
