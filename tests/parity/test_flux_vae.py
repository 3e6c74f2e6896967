"""FLUX VAE (JAX, NHWC) vs diffusers ``AutoencoderKL`` built from a (shrunk) FLUX config, fp32.

The diffusers model has the FLUX structure (DownEncoderBlock2D/UpDecoderBlock2D, one mid attention
block, GroupNorm eps 1e-6, SiLU, no quant convs) with fewer channels/levels: ch 16, ch_mult (1,2,2)
(three levels, so one level keeps its channel count and the decoder's level order is exercised),
2 res blocks per level (3 in the decoder), 16 latent channels. Weights are random (biases and norm
affines too) and reach our module through ``vae_state_dict_to_params`` in diffusers naming; the FLUX
naming path is checked by exporting and re-importing.

Compared: posterior mean and logvar (diffusers' logvar clamp to [-30, 20] does not bind here, which
is asserted) and the decoder output for a given latent. Tolerance: fp32, max abs diff <= 2e-5 on
outputs of O(1) (observed: 2.3e-6 mean/logvar, 3.1e-6 decode on outputs up to 3.3).
"""

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
diffusers = pytest.importorskip("diffusers", reason="needs the [torch] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.checkpoint.vision_tables import (  # noqa: E402
    check_vae_torch_shapes,
    params_to_vae_state_dict,
    vae_state_dict_to_params,
    vae_torch_shapes,
)
from sgt_jax.models.flux_vae import FluxVAE  # noqa: E402
from tests.parity.torch_models import random_diffusers_vae  # noqa: E402

ATOL = 2e-5

CFG = ml_collections.ConfigDict(dict(in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=2,
                                     z_channels=16, num_groups=8, scale_factor=0.3611, shift_factor=0.1159))

@pytest.fixture(scope="module")
def setup():
    hf = random_diffusers_vae(CFG, seed=0)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    params = vae_state_dict_to_params(sd, CFG)
    abstract = nnx.eval_shape(lambda: FluxVAE(CFG, rngs=nnx.Rngs(0)))  # no random init compute
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return hf, sd, params, nnx.merge(graphdef, state, rest)


def test_posterior_and_decode_match_diffusers(setup):
    hf, _, _, vae = setup
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 24, 16, 3)).astype(np.float32)  # non-square: catches H/W mix-ups
    with torch.no_grad():
        post = hf.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        ref_mean = post.mean.permute(0, 2, 3, 1).numpy()
        ref_logvar = post.logvar.permute(0, 2, 3, 1).numpy()
    mean, logvar = jax.jit(lambda m, a: m.encode_stats(a))(vae, jnp.asarray(x))
    assert mean.shape == (2, 6, 4, CFG.z_channels) == ref_mean.shape
    assert np.abs(ref_logvar).max() < 20  # diffusers clamps logvar to [-30, 20]; must not bind here
    for name, got, ref in (("mean", mean, ref_mean), ("logvar", logvar, ref_logvar)):
        err = np.abs(np.asarray(got) - ref).max()
        assert err <= ATOL, f"posterior {name}: max abs diff {err:.2e} > {ATOL}"
        assert np.abs(ref).max() > 0.1

    z = rng.normal(size=(2, 5, 3, CFG.z_channels)).astype(np.float32)
    with torch.no_grad():
        ref = hf.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda m, a: m.decode(a))(vae, jnp.asarray(z)))
    assert got.shape == (2, 20, 12, 3) == ref.shape
    err = np.abs(got - ref).max()
    assert err <= ATOL, f"decode: max abs diff {err:.2e} > {ATOL}"
    assert np.abs(ref).max() > 0.1


def test_flux_naming_roundtrip(setup):
    """Export writes exactly the FLUX key set with OIHW shapes; importing it gives back the same params."""
    _, sd, params, _ = setup
    flux = params_to_vae_state_dict(params, CFG)
    assert {k: v.shape for k, v in flux.items()} == vae_torch_shapes(CFG)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in flux  # level 0 is the highest resolution
    assert "decoder.up.0.upsample.conv.weight" not in flux and "decoder.up.2.upsample.conv.weight" in flux
    # diffusers' decoder block 0 is FLUX level n-1; attention Linear (C,C) is the 1x1 conv (C,C,1,1).
    np.testing.assert_array_equal(flux["decoder.up.2.block.0.conv1.weight"],
                                  sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    np.testing.assert_array_equal(flux["encoder.mid.attn_1.q.weight"][:, :, 0, 0],
                                  sd["encoder.mid_block.attentions.0.to_q.weight"])
    again = vae_state_dict_to_params(flux, CFG)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    check_vae_torch_shapes({k: v.shape for k, v in sd.items()}, CFG)  # diffusers headers validate too
