"""The 7B param tree built abstractly (never allocated): exact parameter count and logical axis names."""

import jax
import numpy as np
import pytest
from flax import nnx

from sgt_jax.configs_util import load_config
from sgt_jax.models import bagel as bagel_lib

# the `ema.safetensors` of `ByteDance-Seed/BAGEL-7B-MoT`: 14,607,260,128 parameters in ema.safetensors, of which the two sin-cos tables
# (recomputed here, not parameters) are 70²·3584 + 64²·3584.
BAGEL_EMA_PARAMS = 14_607_260_128


@pytest.fixture(scope="module")
def abstract_7b():
    cfg = load_config("configs/bagel_sgt.py:7b").model
    return cfg, bagel_lib.abstract_bagel(cfg, with_vae=True)


def test_7b_param_count_matches_bagel_without_allocating(abstract_7b):
    cfg, model = abstract_7b
    params = nnx.state(model, nnx.Param).to_pure_dict()
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    no_vae = {k: v for k, v in params.items() if k != "vae"}
    tables = (cfg.vit.max_patches_per_side ** 2 + cfg.max_latent_size ** 2) * cfg.llm.hidden_size
    assert bagel_lib.count_params(no_vae) + tables == BAGEL_EMA_PARAMS
    # per-expert count of one layer (spec §4.3: 233,058,048)
    und = params["llm"]["layers"]["und"]
    assert bagel_lib.count_params(und) == 28 * 233_058_048
    assert all(x.dtype == np.float32 for x in leaves)  # param_dtype float32 master weights


def test_every_param_has_logical_names_of_its_rank(abstract_7b):
    cfg, model = abstract_7b
    state = nnx.state(model, nnx.Param)
    bad = []
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        if names is None or len(names) != len(var.shape):
            bad.append((path, var.shape, names))
        elif path[:2] == ("llm", "layers") and (names[0] != "layers" or var.shape[0] != cfg.llm.num_layers):
            bad.append((path, var.shape, names))
    assert not bad, bad


def test_llm_tree_layout(abstract_7b):
    cfg, model = abstract_7b
    p = nnx.state(model.llm, nnx.Param).to_pure_dict()
    c = cfg.llm
    shape = lambda *k: p_get(p, k).shape  # noqa: E731
    assert shape("layers", "gen", "q_proj", "kernel") == (28, c.hidden_size, c.num_heads, c.head_dim)
    assert shape("layers", "und", "k_proj", "bias") == (28, c.num_kv_heads, c.head_dim)
    assert shape("layers", "und", "o_proj", "kernel") == (28, c.num_heads, c.head_dim, c.hidden_size)
    assert shape("layers", "gen", "mlp", "down_proj", "kernel") == (28, c.intermediate_size, c.hidden_size)
    assert shape("lm_head", "kernel") == (c.hidden_size, c.vocab_size)
    assert shape("embed_tokens", "embedding") == (c.vocab_size, c.hidden_size)
    assert "bias" not in p["layers"]["und"]["o_proj"]


def p_get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def test_bad_config_values_are_named():
    cfg = load_config("configs/sgt_tiny.py").model
    for field, value, match in (("attention_impl", "flash", "attention_impl"),
                                ("remat_policy", "some", "remat_policy"),
                                ("dtype", "float7", "dtype")):
        bad = cfg.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match=match):
            bagel_lib.abstract_bagel(bad, with_vae=False)
