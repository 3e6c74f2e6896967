"""OmniGen2's sampler step (Euler flow scheduler, dynamic shift, three-way CFG with cfg range) and its
training loss (logit-normal t, dynamic shift v1, bf16 time, global per-element MSE), each against a
numpy reference written from the official code's description (VectorSpaceLab/OmniGen2
``scheduling_flow_match_euler_discrete.py``, ``pipeline_omnigen2.py``, ``transport/transport.py``).
The velocity comes from the tiny JAX DiT with random weights (its parity with PyTorch is
tests/parity/test_omnigen2_dit.py); what is tested here is everything around the model call.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from sgt_jax.models import omnigen2_dit as dit
from sgt_jax.models.flux_vae import patchify_latent, unpatchify_latent
from sgt_jax.models import omnigen2_inputs as inputs
from sgt_jax.sampling import omnigen2_flow as flow
from sgt_jax.train import omnigen2_loss as loss_lib

C = dit.tiny_config()


CALL = jax.jit(lambda m, *a: m(*a))


@pytest.fixture(scope="module")
def model():
    graphdef, state, rest = nnx.split(dit.abstract_dit(C), nnx.Param, ...)  # no eager init
    rng = np.random.default_rng(0)  # random everywhere (the zero-initialised output layers too)
    values = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.2, a.dtype), state.to_pure_dict())
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state, rest)


def spec_timesteps(n, num_tokens):
    t = np.linspace(0, 1, n + 1)[:-1]
    m = np.sqrt(num_tokens) / 40
    t = t / (m - m * t + t)
    return np.append(t, 1.0)


def test_schedule_matches_formula():
    ts = flow.timesteps(50, 128 * 128)
    assert ts.dtype == np.float32 and ts.shape == (51,) and ts[0] == 0 and ts[-1] == 1
    np.testing.assert_allclose(ts, spec_timesteps(50, 128 * 128), atol=1e-6)
    # m = 3.2 at 1024² (latent 128²): the first non-zero step is pushed towards noise
    assert abs(ts[1] - (0.02 / (3.2 - 3.2 * 0.02 + 0.02))) < 1e-6
    assert np.all(np.diff(ts) > 0)


@pytest.mark.parametrize("step,tg,ig,refs,rng,want", [
    (0, 5.0, 2.0, True, (0.0, 1.0), ("cond", "neg_refs", "uncond")),
    (3, 5.0, 2.0, False, (0.0, 1.0), ("cond", "uncond")),       # no refs: two-way, refs never used
    (3, 5.0, 1.0, True, (0.0, 1.0), ("cond", "uncond")),        # ig <= 1: two-way, uncond drops refs
    (3, 1.0, 2.0, True, (0.0, 1.0), ("cond",)),                 # tg <= 1 disables all guidance
    (5, 5.0, 2.0, True, (0.0, 0.5), ("cond", "neg_refs", "uncond")),  # i/N = 0.5: end inclusive
    (6, 5.0, 2.0, True, (0.0, 0.5), ("cond",)),
    (2, 5.0, 2.0, True, (0.25, 1.0), ("cond",)),                # i/N = 0.2 < 0.25
])
def test_guidance_branches(step, tg, ig, refs, rng, want):
    assert flow.guidance(step, 10, tg, ig, refs, rng).passes == want


def _conds(seed=0):
    r = np.random.default_rng(seed)
    text = r.standard_normal((2, 6, C.text_feat_dim)).astype(np.float32)
    mask = np.ones((2, 6), bool)
    neg = r.standard_normal((2, 6, C.text_feat_dim)).astype(np.float32)  # padded like the prompt
    neg_mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    refs = inputs.pack_references([[r.standard_normal((4, 6, 16)).astype(np.float32)],
                                   [r.standard_normal((2, 4, 16)).astype(np.float32),
                                    r.standard_normal((6, 2, 16)).astype(np.float32)]], C.patch_size)
    x = r.standard_normal((2, 4, 6, 16)).astype(np.float32)
    return x, text, mask, neg, neg_mask, refs


@pytest.mark.parametrize("step,tg,ig", [(2, 4.0, 2.0), (2, 4.0, 1.0), (9, 1.0, 2.0)])
def test_one_denoising_step_matches_reference(model, step, tg, ig):
    x, text, mask, neg, neg_mask, refs = _conds()
    ts = flow.timesteps(10, x.shape[1] * x.shape[2])
    x_hw = np.full((2, 2), [x.shape[1] // 2, x.shape[2] // 2], np.int32)

    def velocity(xx, t, which):
        tok = patchify_latent(jnp.asarray(xx), C.patch_size)
        args = {"cond": (text, mask, *refs), "neg_refs": (neg, neg_mask, *refs), "uncond": (neg, neg_mask)}[which]
        return unpatchify_latent(CALL(model, tok, x_hw, t, *args), *x_hw[0], C.patch_size)

    got = flow.denoise_step(velocity, jnp.asarray(x), step, ts, text_scale=tg, image_scale=ig, has_refs=True)

    # reference: spec §3.3-3.4 written out with numpy
    t = np.full((2,), ts[step], np.float32)
    v_c = np.asarray(velocity(x, t, "cond"), np.float64)
    if tg > 1 and ig > 1:
        v_r = np.asarray(velocity(x, t, "neg_refs"), np.float64)
        v_u = np.asarray(velocity(x, t, "uncond"), np.float64)
        v = v_u + ig * (v_r - v_u) + tg * (v_c - v_r)
    elif tg > 1:
        v_u = np.asarray(velocity(x, t, "uncond"), np.float64)
        v = v_u + tg * (v_c - v_u)
    else:
        v = v_c
    want = x + (float(ts[step + 1]) - float(ts[step])) * v
    assert np.abs(np.asarray(got) - want).max() <= 2e-5
    assert np.abs(want - x).max() > 1e-3  # the step moved the latents


def test_loss_matches_formula(model):
    r = np.random.default_rng(1)
    lat = [r.standard_normal((4, 6, 16)).astype(np.float32), r.standard_normal((2, 4, 16)).astype(np.float32)]
    x1, hw = inputs.pack_latents(lat, C.patch_size)  # 6 and 2 tokens: padding must not count
    _, text, mask, _, _, refs = _conds()  # the shapes of the sampler test's "cond" pass: one compile for both
    key = jax.random.key(7)

    def loss(m):
        return loss_lib.flow_loss(lambda xt, t: m(xt, hw, t, text, mask, *refs), jnp.asarray(x1),
                                  jnp.asarray(hw), key)

    got, aux = nnx.jit(loss)(model)
    fn = lambda xt, t: CALL(model, xt, hw, t, text, mask, *refs)  # noqa: E731

    # reference with the same random draws
    k_t, k_x0 = jax.random.split(key)
    u = np.asarray(jax.random.normal(k_t, (2,), jnp.float32), np.float64)
    x0 = np.asarray(jax.random.normal(k_x0, x1.shape, jnp.float32), np.float64)
    t = 1 / (1 + np.exp(-u))
    n = hw[:, 0] * hw[:, 1]
    mu = 0.5 + (1.15 - 0.5) * (n - 256) / (4096 - 256)
    sigma = 1 - t
    sigma = np.exp(mu) * sigma / (np.exp(mu) * sigma + 1 - sigma)
    t = (1 - sigma).astype(np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(aux["t"]), t)
    tt = t.astype(np.float64)[:, None, None]
    x_t = tt * x1 + (1 - tt) * x0
    v = np.asarray(fn(jnp.asarray(x_t, jnp.float32), jnp.asarray(t.astype(np.float32))), np.float64)
    sse, count = 0.0, 0
    for b in range(2):
        k = hw[b, 0] * hw[b, 1]
        sse += np.sum((v[b, :k] - (x1[b, :k] - x0[b, :k])) ** 2)
        count += k * x1.shape[-1]
    want = sse / count
    assert abs(float(got) - want) <= 1e-5 * want, (float(got), want)


def test_time_shift_values():
    # n = 4096 (1024² target): mu = 1.15; n = 256: mu = 0.5; the line is not clipped beyond
    np.testing.assert_allclose(np.asarray(loss_lib.shift_mu(jnp.array([256, 4096, 8192]))),
                               [0.5, 1.15, 1.15 + 0.65 * 4096 / 3840], rtol=1e-6)
    t = np.asarray(loss_lib.shift_time(jnp.array([0.5]), 4096))[0]
    s = np.exp(1.15)
    assert abs(t - (1 - s * 0.5 / (s * 0.5 + 0.5))) < 1e-6
    assert t < 0.5  # the shift moves training times towards noise for large images

