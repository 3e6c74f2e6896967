"""CFG renorm, schedule and interval vs numpy references written from ByteDance-Seed/Bagel `modeling/bagel/bagel.py` `generate_image`."""

import numpy as np
import pytest

from sgt_jax.sampling import flow


def _ref_cfg(v_c, v_t, v_i, s_txt, s_img, kind, rmin):
    """Straight transcription of the spec's prose, one batch-1 image [Z, C] at a time."""
    if s_txt <= 1.0:
        return v_c
    a = v_t + s_txt * (v_c - v_t)
    if kind == "text_channel":
        sc = np.clip(np.linalg.norm(v_c, axis=-1, keepdims=True)
                     / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-8), rmin, 1.0)
        a = a * sc
        return v_i + s_img * (a - v_i) if s_img > 1.0 else a
    b = v_i + s_img * (a - v_i) if s_img > 1.0 else a
    if kind == "global":
        sc = np.clip(np.linalg.norm(v_c) / (np.linalg.norm(b) + 1e-8), rmin, 1.0)
    else:
        sc = np.clip(np.linalg.norm(v_c, axis=-1, keepdims=True)
                     / (np.linalg.norm(b, axis=-1, keepdims=True) + 1e-8), rmin, 1.0)
    return b * sc


@pytest.mark.parametrize("kind", flow.RENORM_TYPES)
@pytest.mark.parametrize("s_txt,s_img,rmin", [(4.0, 1.0, 0.0), (4.0, 2.0, 0.0), (4.0, 1.5, 0.5),
                                              (1.0, 2.0, 0.0), (3.0, 2.0, 1.0)])
def test_combine_cfg_matches_reference(kind, s_txt, s_img, rmin):
    rng = np.random.default_rng(0)
    # batch of 2 images, 12 latent tokens, 8 channels; the batch axis checks per-image "global" norms
    v_c, v_t, v_i = (rng.normal(size=(2, 12, 8)).astype(np.float32) for _ in range(3))
    v_c[1] *= 3.0
    got = np.asarray(flow.combine_cfg(v_c, v_t, v_i, s_txt, s_img, kind, rmin))
    for b in range(2):
        want = _ref_cfg(v_c[b], v_t[b], v_i[b], s_txt, s_img, kind, rmin)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)
    if s_txt > 1 and rmin < 1:  # the renorm really changed something (test cannot pass vacuously)
        assert not np.allclose(got, v_t + s_txt * (v_c - v_t))


def test_renorm_types_differ():
    rng = np.random.default_rng(1)
    v = [rng.normal(size=(1, 6, 4)).astype(np.float32) for _ in range(3)]
    outs = [np.asarray(flow.combine_cfg(*v, 4.0, 2.0, k, 0.0)) for k in flow.RENORM_TYPES]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_schedule_matches_spec():
    t, dt = flow.timestep_schedule(50, 3.0)
    grid = np.linspace(1, 0, 50)
    shifted = 3 * grid / (1 + 2 * grid)
    assert t.shape == (49,) and dt.shape == (49,)
    np.testing.assert_allclose(t, shifted[:-1], rtol=1e-6)
    np.testing.assert_allclose(dt, shifted[:-1] - shifted[1:], rtol=1e-5, atol=1e-7)
    assert t[0] == 1.0 and np.isclose(dt.sum(), 1.0)
    t1, _ = flow.timestep_schedule(5, 1.0)
    np.testing.assert_allclose(t1, [1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="num_timesteps"):
        flow.timestep_schedule(1, 3.0)


def test_cfg_interval_is_half_open():
    s = flow.CfgSettings(4.0, 2.0, (0.4, 1.0), "global", 0.0).validate()
    assert s.scales_at(1.0) == (4.0, 2.0)
    assert s.scales_at(0.4) == (1.0, 1.0)  # lo < t, strictly
    assert s.scales_at(0.41) == (4.0, 2.0)
    with pytest.raises(ValueError, match="local"):
        flow.CfgSettings(renorm_type="local").validate()
    with pytest.raises(ValueError, match="cfg_interval"):
        flow.CfgSettings(interval=(0.6, 0.2)).validate()
