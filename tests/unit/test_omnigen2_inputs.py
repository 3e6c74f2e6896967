"""OmniGen2 DiT inputs: Omni-RoPE ids vs a per-sample loop written from the official ``repo.py``
description, the rotary tables, latent packing, and the condition taken from the MLLM's hidden states."""

import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.models import omnigen2_inputs as inputs


def spec_ids(cap, ref_grids, x_grid):
    """Compact [text | refs | target] ids of one sample, the official way."""
    ids = [(n, n, n) for n in range(cap)]
    shift = cap
    refs = []
    for h, w in ref_grids:
        refs.append([(shift, i, j) for i in range(h) for j in range(w)])
        shift += max(h, w)
    tgt = [(shift, i, j) for i in range(x_grid[0]) for j in range(x_grid[1])]
    return ids, refs, tgt


def test_rope_ids_match_official_rule():
    text_mask = np.array([[1] * 7, [1] * 3 + [0] * 4], bool)
    x_hw = np.array([[3, 2], [2, 4]], np.int32)
    ref_hw = np.array([[[2, 3], [4, 1]], [[1, 2], [0, 0]]], np.int32)
    t_ids, r_ids, x_ids = (np.asarray(a) for a in inputs.omni_rope_ids(jnp.asarray(text_mask), jnp.asarray(x_hw), 8,
                                                                        jnp.asarray(ref_hw), 6))
    for b in range(2):
        cap = int(text_mask[b].sum())
        grids = [tuple(g) for g in ref_hw[b] if g[0] * g[1]]
        want_t, want_r, want_x = spec_ids(cap, grids, tuple(x_hw[b]))
        assert [tuple(v) for v in t_ids[b, :cap]] == want_t
        for r, want in enumerate(want_r):
            assert [tuple(v) for v in r_ids[b, r, :len(want)]] == want
        assert [tuple(v) for v in x_ids[b, :len(want_x)]] == want_x
    assert x_ids[0, 0, 0] == 7 + 3 + 4  # the axis-0 shift grows by max(h, w), not by the token count


def test_rope_tables_and_rotation():
    (c0, s0), _, _ = inputs.rope_tables((4, 4, 4), (300, 64, 64))
    ang = 299 * 10000.0 ** (-np.arange(0, 4, 2) / 4)
    np.testing.assert_allclose(c0[299], np.cos(ang), atol=1e-7)  # float64 angles, then fp32
    x = np.random.default_rng(0).standard_normal((1, 2, 1, 4)).astype(np.float32)
    cos = np.array([[[0.0, 1.0], [1.0, 0.0]]], np.float32)
    sin = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    out = np.asarray(inputs.apply_rope_interleaved(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin)))
    # token 0: pair (x0, x1) turned by 90°, pair (x2, x3) unchanged; token 1 the other way round
    np.testing.assert_allclose(out[0, 0, 0], [-x[0, 0, 0, 1], x[0, 0, 0, 0], x[0, 0, 0, 2], x[0, 0, 0, 3]], atol=1e-7)
    np.testing.assert_allclose(out[0, 1, 0], [x[0, 1, 0, 0], x[0, 1, 0, 1], -x[0, 1, 0, 3], x[0, 1, 0, 2]], atol=1e-7)


def test_range_check_names_the_axis():
    with pytest.raises(ValueError, match="axis 0 id 300 >= axes_lens"):  # the target's shift after 300 text tokens
        inputs.check_rope_range((300, 64, 64), np.ones((1, 300), bool), np.array([[2, 2]]))
    with pytest.raises(ValueError, match="axis 2 id 64"):
        inputs.check_rope_range((300, 64, 64), np.ones((1, 5), bool), np.array([[2, 65]]))
    inputs.check_rope_range((300, 64, 64), np.ones((1, 5), bool), np.array([[64, 64]]),
                            np.array([[[8, 8], [0, 0]]]))


def test_pack_unpack_round_trip():
    r = np.random.default_rng(0)
    lat = [r.standard_normal((6, 4, 16)).astype(np.float32), r.standard_normal((2, 8, 16)).astype(np.float32)]
    tok, hw = inputs.pack_latents(lat, 2)
    assert tok.shape == (2, 6, 64) and hw.tolist() == [[3, 2], [1, 4]]
    assert not tok[1, 4:].any()  # padding
    np.testing.assert_array_equal(tok[0, 1], lat[0][0:2, 2:4].reshape(-1))  # (p1, p2, c), c fastest
    for a, b in zip(inputs.unpack_latents(tok, hw, 2), lat):
        np.testing.assert_array_equal(a, b)


def test_mllm_condition():
    h = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    # all tokens (image-pad tokens included), the attention mask as the text mask
    c, m = inputs.mllm_condition(jnp.asarray(h), jnp.asarray(mask), max_len=10)
    np.testing.assert_array_equal(np.asarray(c), h)
    np.testing.assert_array_equal(np.asarray(m), mask)
    # longer than max_len: the last max_len positions
    c, m = inputs.mllm_condition(jnp.asarray(h), jnp.asarray(mask), max_len=4)
    np.testing.assert_array_equal(np.asarray(c), h[:, -4:])
    np.testing.assert_array_equal(np.asarray(m), mask[:, -4:])
    # dropping image-token positions: the rest compacted to the left, new mask
    drop = np.array([[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1]], bool)
    c, m = inputs.mllm_condition(jnp.asarray(h), jnp.asarray(mask), max_len=10, drop_mask=jnp.asarray(drop))
    np.testing.assert_array_equal(np.asarray(m), [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(c)[0, :2], h[0, [0, 3]])
    np.testing.assert_array_equal(np.asarray(c)[1, :4], h[1, [1, 2, 3, 4]])
