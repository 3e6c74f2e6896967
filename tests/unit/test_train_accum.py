"""Gradient accumulation (config.train.microbatches): one update over K micro-batches equals one update
over the whole batch (losses and metrics rtol 1e-5; parameter updates rtol 1e-5 with an absolute floor of 1e-5 of the largest update), on a 2-device FSDP mesh so the
micro-batch split keeps each device's own rows; and optim.mu_dtype keeps Adam's first moment in bf16."""

import jax
import numpy as np
import pytest

from sgt_jax import parallel
from sgt_jax.train import state as state_lib
from sgt_jax.train import step as step_lib
from tests.sharding.fake_batches import make_batch, small_config

pytestmark = pytest.mark.multidevice


def _config(latents: str, k: int):
    cfg = small_config(packs=4, latents=latents)
    cfg.train.microbatches = k
    cfg.train.ema_decay = 0.0
    # An update that is smooth in the gradient (clip off, eps 1 so Adam's first step is ~g/(|g|+1), not
    # sign(g)), and a learning rate that moves the parameters far beyond the tolerance.
    cfg.optim.update(dict(warmup_steps=0, lr=1.0, eps=1.0, clip_norm=0.0))
    cfg.mesh.shape = (1, 2, 1)
    return cfg


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _two_steps(cfg, init=None):
    mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:2])
    spec, jitted, _ = step_lib.build(cfg, mesh)
    state = state_lib.init_state(cfg, spec) if init is None else jax.device_put(init, spec.shardings)
    start = _host(state)
    rules = parallel.logical_rules(cfg)
    metrics = []
    for seed in (0, 1):
        state, m = jitted(state, parallel.to_global(make_batch(cfg, seed=seed), mesh, rules))
        metrics.append(_host(m))
    return start, _host(state), metrics


@pytest.mark.slow
def test_microbatches_equal_whole_batch():
    start, whole, m_whole = _two_steps(_config("cached", 1))
    _, micro, m_micro = _two_steps(_config("cached", 2), init=start)
    for a, b in zip(m_whole, m_micro):
        for k in ("loss", "ce", "mse", "grad_norm", "n_ce", "n_mse"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
        assert bool(a["applied"]) and bool(b["applied"])
    moved = max(float(np.max(np.abs(p1 - p0))) for p0, p1 in
                zip(jax.tree.leaves(start["params"]), jax.tree.leaves(whole["params"])))
    assert moved > 1e-2  # the comparison below is far from trivially true
    # The updates (params after - before) agree to 1e-5 of the largest update: the two programs sum the
    # gradient in a different order, so an element whose update is tiny may differ by fp32 rounding of the
    # large ones (one element of 32768 did, by 1.4e-6, at a 1e-6 absolute tolerance).
    for (path, p0), a, b in zip(jax.tree_util.tree_leaves_with_path(start["params"]), jax.tree.leaves(whole["params"]),
                                jax.tree.leaves(micro["params"])):
        np.testing.assert_allclose(b - p0, a - p0, rtol=1e-5, atol=1e-5 * moved, err_msg=jax.tree_util.keystr(path))


def test_microbatches_must_divide_the_batch():
    cfg = _config("cached", 3)
    with pytest.raises(ValueError, match="config.train.microbatches=3"):
        step_lib.build(cfg, parallel.make_mesh(cfg.mesh, devices=jax.devices()[:2]))
    cfg = _config("cached", 4)  # 1 pack per micro-batch cannot split over 2 devices
    with pytest.raises(ValueError, match="does not split over the 2 batch shards"):
        step_lib.build(cfg, parallel.make_mesh(cfg.mesh, devices=jax.devices()[:2]))


def test_mu_dtype_bfloat16():
    cfg = _config("cached", 1)
    cfg.optim.mu_dtype = "bfloat16"
    spec = state_lib.make_state_spec(cfg, parallel.make_mesh(cfg.mesh, devices=jax.devices()[:2]))
    adam = [x for x in jax.tree.leaves(spec.abstract["opt"], is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu")]
    assert len(adam) == 1
    adam = adam[0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {np.dtype("float32")}
    cfg.optim.mu_dtype = "float16"
    with pytest.raises(ValueError, match="config.optim.mu_dtype='float16'"):
        state_lib.make_state_spec(cfg, parallel.make_mesh(cfg.mesh, devices=jax.devices()[:2]))
