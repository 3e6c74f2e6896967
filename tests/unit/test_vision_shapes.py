"""Vision parts without torch: shapes, orders, logical names, masking, conversion tables.

The parity tests (tests/parity/test_siglip_navit.py, test_flux_vae.py) check numerics against PyTorch;
these check the contracts other code relies on and run on both CI legs.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sgt_jax.checkpoint import vision_tables as vt, vit_table
from sgt_jax.configs_util import load_config
from sgt_jax.models.flux_vae import FluxVAE, patchify_latent, unpatchify_latent
from sgt_jax.models.siglip_navit import SiglipNaViT, image_attention, patchify


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/sgt_tiny.py").model


@pytest.fixture(scope="module")
def cfg7b():
    return load_config("configs/bagel_sgt.py:7b").model


def _abstract(cls, c, **kw):
    return nnx.eval_shape(lambda: cls(c, rngs=nnx.Rngs(0), **kw))  # no mesh needed: params are unplaced


def _random_sd(shapes, seed=0):
    """Random torch-layout tensors at unit-ish activation scale (norm weights around 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in shapes.items():
        if len(s) > 1:
            out[k] = rng.normal(size=s) / math.sqrt(math.prod(s[1:]))
        elif "norm" in k and k.endswith("weight"):
            out[k] = 1.0 + 0.1 * rng.normal(size=s)
        else:
            out[k] = 0.1 * rng.normal(size=s)
    return {k: v.astype(np.float32) for k, v in out.items()}


def _build(cls, c, **kw):
    """A module with random weights, filled through the conversion tables: building abstractly and
    merging numpy weights avoids eager per-parameter init (slow on the shared 2-core CI machine)."""
    abstract = _abstract(cls, c, **kw)
    if cls is SiglipNaViT:
        params = vit_table.vit_state_dict_to_params(_random_sd(vit_table.vit_torch_shapes(c)), c)
    else:
        params = vt.vae_state_dict_to_params(_random_sd(vt.vae_torch_shapes(c)), c)
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest)


def _flat_params(module):
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize("which", ["vit", "vae"])
def test_every_param_has_logical_names(cfg, which):
    m = _abstract(SiglipNaViT if which == "vit" else FluxVAE, cfg[which])
    for name, var in _flat_params(m).items():
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), f"{name}: {names} vs shape {var.shape}"
        if which == "vit" and name.startswith("layers."):
            assert names[0] == "layers" and var.shape[0] == cfg.vit.num_layers, name


@pytest.mark.parametrize("which", ["vit", "vae"])
def test_tables_match_param_tree(cfg, which):
    """The torch-table tree has exactly the module's pure-dict structure and shapes (tiny config)."""
    m = _abstract(SiglipNaViT if which == "vit" else FluxVAE, cfg[which])
    pure = nnx.state(m, nnx.Param).to_pure_dict()
    rng = np.random.default_rng(0)
    if which == "vit":
        sd = {k: rng.normal(size=s).astype(np.float32) for k, s in vit_table.vit_torch_shapes(cfg.vit).items()}
        sd["language_model.model.norm.weight"] = np.ones(3, np.float32)  # other parts' keys are ignored
        params = vit_table.vit_state_dict_to_params(sd, cfg.vit)
        back = vit_table.params_to_vit_state_dict(params, cfg.vit)
        sd.pop("language_model.model.norm.weight")
    else:
        sd = {k: rng.normal(size=s).astype(np.float32) for k, s in vt.vae_torch_shapes(cfg.vae).items()}
        params = vt.vae_state_dict_to_params(sd, cfg.vae)
        back = vt.params_to_vae_state_dict(params, cfg.vae)
    assert jax.tree.structure(params) == jax.tree.structure(pure)
    jax.tree.map(lambda a, b: np.testing.assert_equal(np.shape(a), b.shape), params, pure)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_7b_tables_match_spec_counts(cfg7b):
    """the `ema.safetensors` of `ByteDance-Seed/BAGEL-7B-MoT`: ViT 402,552,736 params (26 layers); ae.safetensors 244 tensors, 83,819,683."""
    vit = vit_table.vit_torch_shapes(cfg7b.vit)
    assert sum(math.prod(s) for s in vit.values()) == 402_552_736
    assert vit["vit_model.vision_model.embeddings.patch_embedding.weight"] == (1152, 588)
    assert vit["vit_model.vision_model.embeddings.position_embedding.weight"] == (4900, 1152)
    vae = vt.vae_torch_shapes(cfg7b.vae)
    assert len(vae) == 244 and sum(math.prod(s) for s in vae.values()) == 83_819_683
    assert vae["encoder.conv_out.weight"] == (32, 512, 3, 3) and vae["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert vae["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert vae["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in vae and "encoder.down.3.downsample.conv.weight" not in vae


def test_tables_report_every_problem(cfg):
    shapes = dict(vt.vae_torch_shapes(cfg.vae))
    shapes.pop("encoder.conv_in.weight")
    shapes.pop("decoder.norm_out.bias")
    shapes["encoder.quant_conv.weight"] = (8, 8, 1, 1)
    shapes["decoder.conv_out.weight"] = (3, 32, 1, 1)
    with pytest.raises(ValueError) as e:
        vt.check_vae_torch_shapes(shapes, cfg.vae)
    msg = str(e.value)
    for needle in ("2 missing", "encoder.conv_in.weight", "decoder.norm_out.bias", "1 unexpected",
                   "encoder.quant_conv.weight", "1 mis-shaped", "decoder.conv_out.weight: got (3, 32, 1, 1)"):
        assert needle in msg, (needle, msg)
    sd = {k: np.zeros(s, np.float32) for k, s in vit_table.vit_torch_shapes(cfg.vit).items()}
    del sd["vit_model.vision_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="layers.1.mlp.fc2.bias"):
        vit_table.vit_state_dict_to_params(sd, cfg.vit)
    params = vt.vae_state_dict_to_params({k: np.zeros(s, np.float32) for k, s in vt.vae_torch_shapes(cfg.vae).items()},
                                         cfg.vae)
    del params["decoder"]["up"][1]["upsample"]
    with pytest.raises(ValueError, match=r"missing:\s+decoder\.up\.1\.upsample\.conv\.bias"):
        vt.params_to_vae_state_dict(params, cfg.vae)


def test_diffusers_names_map_to_flux():
    f = vt.diffusers_vae_key_to_flux
    assert f("encoder.down_blocks.2.resnets.1.conv_shortcut.weight", 4) == "encoder.down.2.block.1.nin_shortcut.weight"
    assert f("encoder.down_blocks.0.downsamplers.0.conv.bias", 4) == "encoder.down.0.downsample.conv.bias"
    assert f("decoder.up_blocks.0.resnets.2.norm1.weight", 4) == "decoder.up.3.block.2.norm1.weight"
    assert f("decoder.up_blocks.2.upsamplers.0.conv.weight", 4) == "decoder.up.1.upsample.conv.weight"
    assert f("decoder.mid_block.attentions.0.to_out.0.bias", 4) == "decoder.mid.attn_1.proj_out.bias"
    assert f("encoder.mid_block.attentions.0.group_norm.weight", 4) == "encoder.mid.attn_1.norm.weight"
    assert f("encoder.mid_block.resnets.1.conv2.weight", 4) == "encoder.mid.block_2.conv2.weight"
    assert f("decoder.conv_norm_out.bias", 4) == "decoder.norm_out.bias"
    assert f("decoder.up.3.block.2.norm1.weight", 4) == "decoder.up.3.block.2.norm1.weight"  # FLUX passes through


def test_patchify_order_and_positions():
    ps, g = 2, 5
    img = np.arange(4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)  # 2x3 patches
    patches, pos = patchify(img, ps, g)
    assert patches.shape == (6, 12) and pos.tolist() == [0, 1, 2, 5, 6, 7]
    # patch (1, 2), pixel (row 1, col 0) in the patch, channel 2 -> vector index (1*ps + 0)*3 + 2
    assert patches[1 * 3 + 2, (1 * ps + 0) * 3 + 2] == img[1 * ps + 1, 2 * ps + 0, 2]
    np.testing.assert_array_equal(patches[4], img[2:4, 2:4].reshape(-1))
    # the data pipeline has its own copy (sgt_jax/data/transforms.py): the two must never drift apart
    from sgt_jax.data.transforms import patchify as data_patchify

    big = np.random.default_rng(1).uniform(-1, 1, (6, 10, 3)).astype(np.float32)
    for a, b in zip(patchify(big, ps, g), data_patchify(big, ps, g)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="multiples of the ViT patch size"):
        patchify(np.zeros((5, 4, 3)), ps, g)
    with pytest.raises(ValueError, match="at most 5 per side"):
        patchify(np.zeros((12, 4, 3)), ps, g)


def test_latent_patchify_roundtrip_and_order():
    z = np.random.default_rng(0).normal(size=(2, 6, 4, 3)).astype(np.float32)
    t = patchify_latent(z, 2)
    assert t.shape == (2, 6, 12)
    # token (r=1, c=1) = row-major index 1*2+1; element (pr=1, pc=0, ch=2) = (1*2+0)*3+2, channel fastest
    assert t[1, 3, (1 * 2 + 0) * 3 + 2] == z[1, 3, 2, 2]
    np.testing.assert_array_equal(unpatchify_latent(t, 3, 2, 2), z)
    np.testing.assert_array_equal(np.asarray(patchify_latent(jnp.asarray(z), 2)), t)  # jax == numpy
    with pytest.raises(ValueError):
        unpatchify_latent(t, 2, 2, 2)


def test_chunked_attention_equals_dense_and_isolates_images():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 13, 2, 4)), jnp.float32) for _ in range(3))
    img = jnp.asarray([[0] * 5 + [1] * 6 + [-1] * 2, [-1] * 3 + [2] * 10], jnp.int32)

    @jax.jit
    def run(q, k, v, img):
        dense = image_attention(q, k, v, img, impl="dense")
        chunked = image_attention(q, k, v, img, impl="chunked", chunk=4)  # 13 rows: last block padded
        # image 0 alone: must give the same rows (nothing leaks across images or from padding)
        alone = image_attention(q[:1, :5], k[:1, :5], v[:1, :5], img[:1, :5], impl="dense")
        return dense, chunked, alone

    dense, chunked, alone = run(q, k, v, img)
    np.testing.assert_allclose(chunked, dense, atol=1e-6)
    np.testing.assert_allclose(dense[:1, :5], alone, atol=1e-6)
    assert np.isfinite(np.asarray(dense)).all()


def test_vit_forward_grad_and_remat(cfg):
    c = ml_collections.ConfigDict(cfg.vit.to_dict())
    c.patch_size = 2
    m = _build(SiglipNaViT, c, remat_policy="full", attention_impl="chunked", attention_chunk=4)
    x = jnp.ones((1, 9, 12))
    pos = jnp.arange(9)[None]
    img = jnp.asarray([[0] * 4 + [1] * 3 + [-1] * 2])
    loss = lambda mm: jnp.sum(mm(x, pos, img)[:, :7] ** 2)  # noqa: E731
    out, grads = jax.jit(lambda mm: (mm(x, pos, img), nnx.grad(loss)(mm)))(m)
    assert out.shape == (1, 9, c.hidden_size)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    # padding rows may carry any pos; a real row with an id outside the table is NaN, never clamped
    run = jax.jit(lambda mm, p: mm(x, p, img))
    np.testing.assert_array_equal(run(m, pos.at[0, 8].set(-5)), out)
    assert np.isnan(np.asarray(run(m, pos.at[0, 0].set(c.max_patches_per_side ** 2)))[0, :4]).all()
    with pytest.raises(ValueError, match="vit patches"):
        m(jnp.ones((1, 9, 5)), pos, img)
    with pytest.raises(ValueError, match="remat_policy"):
        _abstract(SiglipNaViT, c, remat_policy="bogus")


def test_vae_shapes_sampling_and_scale(cfg):
    vae = _build(FluxVAE, cfg.vae)
    d = 2 ** (len(cfg.vae.ch_mult) - 1)
    x = jnp.zeros((1, 8 * d, 4 * d, 3))
    z = jnp.linspace(-2, 2, 7)
    m0, lv0 = jnp.full((4096,), 0.5), jnp.full((4096,), np.log(0.25))

    def run(m):
        mean, logvar = m.encode_stats(x)
        return mean, logvar, m.decode(mean), m.sample(m0, lv0, jax.random.key(0)), m.scale(z), m.unscale(m.scale(z))

    mean, logvar, y, s, scaled, back = jax.jit(run)(vae)
    assert mean.shape == logvar.shape == (1, 8, 4, cfg.vae.z_channels)
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
    assert abs(float(s.mean()) - 0.5) < 0.05 and abs(float(s.std()) - 0.5) < 0.05
    np.testing.assert_allclose(scaled, cfg.vae.scale_factor * (z - cfg.vae.shift_factor), rtol=1e-6)
    np.testing.assert_allclose(back, z, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of"):
        jax.eval_shape(lambda m: m.encode_stats(jnp.zeros((1, 3 * d + 1, 4 * d, 3))), vae)
    with pytest.raises(ValueError, match="channels"):
        jax.eval_shape(lambda m: m.decode(jnp.zeros((1, 2, 2, cfg.vae.z_channels + 1))), vae)
