"""Conversion tables: against the spec's key listing, against the model's param tree, slice mapping, and the
in-memory round trip (no files, no orbax). Pure numpy + abstract shapes: fast."""

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from sgt_jax.checkpoint import convert, vision_tables
from sgt_jax.checkpoint.table import ConversionError, Entry, flatten_paths
from sgt_jax.configs_util import load_config
from tests.fixtures.bagel_folder import ema_key_shapes, flux_ae_key_shapes, sincos_bf16

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def tiny():
    return load_config("configs/sgt_tiny.py").model


@pytest.fixture(scope="module")
def big():
    return load_config("configs/bagel_sgt.py:7b").model


def _random_sd(shapes, seed=0, dtype=BF16):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32).astype(dtype) for k, s in shapes.items()}


def test_fixture_listing_matches_spec_counts(big):
    """The fixture's independent key listing reproduces spec §4.3/§4.4's counts for BAGEL-7B-MoT."""
    ema = ema_key_shapes(big)
    assert len(ema) == 1223
    assert sum(int(np.prod(s)) for s in ema.values()) == 14_607_260_128
    ae = flux_ae_key_shapes(big.vae)
    assert len(ae) == 244
    assert sum(int(np.prod(s)) for s in ae.values()) == 83_819_683


@pytest.mark.parametrize("variant", ["tiny", "big"])
def test_tables_cover_the_spec_listing(variant, request):
    m = request.getfixturevalue(variant)
    assert convert.expected_ema_shapes(m) == ema_key_shapes(m)
    assert vision_tables.vae_torch_shapes(m.vae) == flux_ae_key_shapes(m.vae)


def test_tables_match_the_model_param_tree(tiny):
    """Every non-VAE Bagel parameter is produced by exactly one table row with the model's shape.

    (Paths do not depend on size; the 7B shapes follow from the same formulas and are checked against
    the spec listing above. tests/unit/test_model_shapes.py eval_shapes the 7B model.)"""
    from sgt_jax.checkpoint.table import check_tree
    from sgt_jax.models.bagel import abstract_params

    m = tiny
    with nnx.use_eager_sharding(False):
        tree = abstract_params(m)
    check_tree(convert.bagel_table(m), {k: v for k, v in tree.items() if k != "vae"})


def test_slice_mapping_equals_full_conversion():
    """read_slice(param index) == to_param(full tensor)[index] for splits, transposes and stacking."""
    rng = np.random.default_rng(1)
    entries = [
        Entry(("q",), "l.{i}.q.weight", (4 * 3, 5), ((4, 3), (5,)), (2, 0, 1), layers=3),  # (E, H, D)
        Entry(("o",), "l.{i}.o.weight", (5, 4 * 3), ((5,), (4, 3)), (1, 2, 0), layers=2),  # (H, D, E)
        Entry(("b",), "b", (6, 7), None, (1, 0)),
        Entry(("c",), "c", (8,)),
    ]
    for e in entries:
        sd = {k: rng.standard_normal(e.torch_shape) for k in e.torch_keys()}
        full = (np.stack([e.to_param(sd[k]) for k in e.torch_keys()]) if e.layers else e.to_param(sd[e.key]))
        assert full.shape == e.param_shape
        for _ in range(25):
            idx = []
            for d in full.shape:
                a = int(rng.integers(0, d))
                idx.append(slice(a, int(rng.integers(a + 1, d + 1))))
            got = e.read_slice(lambda k, i: sd[k][i], tuple(idx))
            np.testing.assert_array_equal(got, full[tuple(idx)])
        back = e.to_torch(full[0] if e.layers else full)
        np.testing.assert_array_equal(back, sd[e.torch_keys()[0]])


def test_in_memory_round_trip_is_bit_identical(tiny):
    sd = _random_sd(ema_key_shapes(tiny), seed=3)
    params = convert.bagel_state_dict_to_params(sd, tiny)
    assert all(v.dtype == np.float32 for v in flatten_paths(params).values())
    back = convert.params_to_bagel_state_dict(params, tiny, dtype=BF16)
    assert set(back) == set(sd)
    for k, v in sd.items():
        if k.endswith("pos_embed.pos_embed"):
            continue
        assert back[k].dtype == BF16 and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k].view(np.uint16), v.view(np.uint16), err_msg=k)
    # sin-cos tables: recomputed, equal to the formula rounded to bf16
    np.testing.assert_array_equal(back["vit_pos_embed.pos_embed"].view(np.uint16),
                                  sincos_bf16(tiny.vit.max_patches_per_side, tiny.llm.hidden_size).view(np.uint16))
    np.testing.assert_array_equal(back["latent_pos_embed.pos_embed"].view(np.uint16),
                                  sincos_bf16(tiny.max_latent_size, tiny.llm.hidden_size).view(np.uint16))
    # without the tables the import works too (the official loader drops them as well)
    no_tables = {k: v for k, v in sd.items() if not k.endswith("pos_embed.pos_embed")}
    p2 = convert.bagel_state_dict_to_params(no_tables, tiny)
    np.testing.assert_array_equal(p2["llm"]["lm_head"]["kernel"], params["llm"]["lm_head"]["kernel"])


def test_layouts_follow_the_spec(tiny):
    """Spot checks of the transforms: Linear transpose, head split, layer stacking, _moe_gen placement."""
    sd = _random_sd(ema_key_shapes(tiny), seed=4, dtype=np.float32)
    p = convert.bagel_state_dict_to_params(sd, tiny)
    c = tiny.llm
    w = sd["language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"]  # (Hq*D, H)
    np.testing.assert_array_equal(p["llm"]["layers"]["gen"]["q_proj"]["kernel"][1],
                                  w.T.reshape(c.hidden_size, c.num_heads, c.head_dim))
    w = sd["language_model.model.layers.0.self_attn.o_proj.weight"]  # (H, Hq*D)
    np.testing.assert_array_equal(p["llm"]["layers"]["und"]["o_proj"]["kernel"][0],
                                  w.T.reshape(c.num_heads, c.head_dim, c.hidden_size))
    np.testing.assert_array_equal(p["llm"]["layers"]["gen"]["mlp"]["down_proj"]["kernel"][1],
                                  sd["language_model.model.layers.1.mlp_moe_gen.down_proj.weight"].T)
    np.testing.assert_array_equal(p["llm"]["norm_gen"]["scale"], sd["language_model.model.norm_moe_gen.weight"])
    np.testing.assert_array_equal(p["time_embedder"]["mlp_2"]["kernel"], sd["time_embedder.mlp.2.weight"].T)


def test_errors_name_every_bad_key(tiny):
    sd = _random_sd(ema_key_shapes(tiny), seed=5)
    del sd["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"]
    sd["language_model.model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 3), BF16)
    sd["connector.fc3.weight"] = np.zeros((2,), BF16)
    sd["latent_pos_embed.pos_embed"] = np.zeros((5, 5), BF16)
    with pytest.raises(ConversionError) as err:
        convert.bagel_state_dict_to_params(sd, tiny)
    msg = str(err.value)
    assert "missing in state dict: language_model.model.layers.1.mlp_moe_gen.up_proj.weight" in msg
    assert "unexpected in state dict: connector.fc3.weight" in msg
    assert "wrong shape in state dict: language_model.model.layers.0.self_attn.q_proj.weight is [3, 3]" in msg
    assert "latent_pos_embed.pos_embed is [5, 5]" in msg
    assert len(err.value.problems) == 4
