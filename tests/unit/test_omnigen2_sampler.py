"""OmniGen2 sampler rules without a model (sgt_jax/sampling/omnigen2_sampler.py): the official resolution rule
(``get_new_height_width``: scale down only, to <= max_pixels and <= max_side, sides floored to 16) and the
stacking of the CFG passes into one call (which text, mask and reference slots each row gets). The whole
loop against the PyTorch reference is tests/parity/test_omnigen2_denoise.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.sampling import omnigen2_sampler as sampler


def spec_fit(h, w, max_pixels, max_side, m=16):
    ratio = min((max_pixels / (h * w)) ** 0.5, max_side / max(h, w), 1.0)
    return int(h * ratio) // m * m, int(w * ratio) // m * m


@pytest.mark.parametrize("h,w,px,side,want", [
    (1024, 1024, 1024 ** 2, 1024, (1024, 1024)),
    (100, 60, 1024 ** 2, 1024, (96, 48)),          # never upscaled, floored to 16
    (2000, 1000, 1024 ** 2, 4096, (1440, 720)),    # pixel limit: ratio sqrt(1024²/2e6) = 0.724
    (3000, 600, 1024 ** 2, 1024, (1024, 192)),     # side limit: ratio 1024/3000
])
def test_fit_size(h, w, px, side, want):
    assert sampler.fit_size(h, w, px, side) == want == spec_fit(h, w, px, side)


def test_fit_size_random_against_formula():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(32, 3000, (200, 2)):
        assert sampler.fit_size(int(h), int(w), 1024 ** 2, 2048) == spec_fit(int(h), int(w), 1024 ** 2, 2048)
    assert sampler.fit_size(40, 56, 32 * 32, 64, multiple=8) == (24, 32)


def test_passes_are_stacked_with_their_own_conditions():
    seen = {}

    def call(x, hw, t, text, mask, ref_tok, ref_hw):
        seen.update(x=x, text=text, mask=mask, ref_tok=ref_tok, ref_hw=ref_hw)
        return jnp.arange(x.shape[0], dtype=jnp.float32)[:, None, None] + jnp.zeros(x.shape)

    rng = np.random.default_rng(1)
    text, neg = (jnp.asarray(rng.standard_normal((1, n, 8)), jnp.float32) for n in (5, 3))
    refs = (jnp.ones((1, 2, 4, 12)), jnp.asarray([[[2, 2], [1, 3]]], jnp.int32))
    c = sampler.Conditions(text, jnp.ones((1, 5), bool), neg, jnp.ones((1, 3), bool), refs)
    vel = sampler.stacked_velocities(call, jnp.asarray([[2, 2]]), c)
    out = vel(jnp.zeros((1, 4, 12)), jnp.zeros((1,)), ("cond", "neg_refs", "uncond"))
    assert [float(out[p][0, 0, 0]) for p in ("cond", "neg_refs", "uncond")] == [0.0, 1.0, 2.0]  # row order
    assert seen["text"].shape == (3, 5, 8) and seen["x"].shape == (3, 4, 12)
    np.testing.assert_array_equal(seen["text"][0], text[0])
    np.testing.assert_array_equal(seen["text"][1, :3], neg[0])
    np.testing.assert_array_equal(seen["mask"], [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(seen["ref_hw"][:2], np.repeat(refs[1], 2, 0))  # prompt / negative + refs
    assert not np.asarray(seen["ref_hw"][2]).any() and not np.asarray(seen["ref_tok"][2]).any()  # no refs
    # text to image: no reference inputs at all
    vel = sampler.stacked_velocities(call, jnp.asarray([[2, 2]]), c._replace(refs=None))
    vel(jnp.zeros((1, 4, 12)), jnp.zeros((1,)), ("cond", "uncond"))
    assert seen["ref_tok"] is None and seen["text"].shape == (2, 5, 8)
