"""OmniGen2's whole denoising loop (JAX: sgt_jax/sampling/omnigen2_sampler.py, the CFG passes stacked in
one DiT call per step) vs the PyTorch reference of the official loop (tests/parity/omnigen2_reference.py
``reference_denoise``: one transformer call per pass, the scheduler written from the official code),
tiny random fp32 DiT with the same weights, 3 steps from the same noise.

Cases: an edit with text + image guidance (three passes; the unconditional one without the reference)
inside a cfg range that ends mid-way, so the last step is unguided; text to image with a range that starts
late. (Text guidance alone with a reference: tests/unit/test_omnigen2_flow.py, one step.) Prompt and negative prompt have different lengths (the stacked call
pads them). Tolerance max |Δ| <= 5e-5 on latents of O(1) after 3 guided steps (observed 4.5e-6; guiding the last step too gives 0.2).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
pytest.importorskip("diffusers", reason="needs the [torch] extra")

import jax.numpy as jnp  # noqa: E402

from sgt_jax.models import omnigen2_inputs as inputs  # noqa: E402
from sgt_jax.sampling import omnigen2_sampler as sampler  # noqa: E402
from tests.parity.omnigen2_reference import OmniGen2Reference, randomize_, reference_denoise  # noqa: E402
from tests.parity.test_omnigen2_dit import C, load_jax, reference_config  # noqa: E402

ATOL = 5e-5


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = OmniGen2Reference(reference_config(C)).eval()
    randomize_(ref, seed=2)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return ref, sampler.DitEngine(load_jax(sd)[0])


@pytest.mark.parametrize("with_refs,tg,ig,cfg_range", [
    (True, 3.0, 2.0, (0.0, 0.5)),   # steps 0, 1 three passes (1/3 <= 0.5), step 2 unguided
    (False, 4.0, 1.0, (0.3, 1.0)),  # step 0 unguided (0 < 0.3), steps 1, 2 two passes
])
def test_denoising_loop_matches_reference(models, with_refs, tg, ig, cfg_range):
    ref, engine = models
    rng = np.random.default_rng(5)
    ch, d = C.in_channels, C.text_feat_dim
    x0 = rng.standard_normal((ch, 8, 6)).astype(np.float32)
    text = rng.standard_normal((1, 7, d)).astype(np.float32)
    neg = rng.standard_normal((1, 4, d)).astype(np.float32)
    refs = [[rng.standard_normal((ch, 4, 6)).astype(np.float32)]] if with_refs else None
    want = reference_denoise(ref, [torch.from_numpy(x0)], torch.from_numpy(text), torch.ones(1, 7, dtype=torch.bool),
                             torch.from_numpy(neg), torch.ones(1, 4, dtype=torch.bool),
                             None if refs is None else [[torch.from_numpy(z) for z in refs[0]]],
                             num_steps=3, text_scale=tg, image_scale=ig, cfg_range=cfg_range)[0].numpy()

    nhwc = lambda z: np.moveaxis(z, 0, -1)  # noqa: E731
    x_tok, x_hw = inputs.pack_latents([nhwc(x0)], C.patch_size)
    r = None if refs is None else inputs.pack_references([[nhwc(z) for z in refs[0]]], C.patch_size)
    cond = sampler.Conditions(jnp.asarray(text), jnp.ones((1, 7), bool), jnp.asarray(neg), jnp.ones((1, 4), bool), r)
    got = engine.sample(x_tok, x_hw, cond, num_steps=3, text_scale=tg, image_scale=ig, cfg_range=cfg_range)
    got = np.moveaxis(inputs.unpack_latents(np.asarray(got), x_hw, C.patch_size)[0], -1, 0)
    assert np.abs(want - x0).max() > 0.1  # the loop moved the latents
    err = float(np.abs(got - want).max())
    assert err <= ATOL, err
