"""State kept in host memory (``train.ema_offload``, ``train.opt_offload``) and updated layer by layer
(sgt_jax/train/offload.py): the same update as on the device, the parts in the memory they belong to,
a non-finite step that changes nothing, on a 2-device FSDP mesh so every slice is itself sharded."""

import jax
import numpy as np
import pytest

from sgt_jax import parallel
from sgt_jax.train import state as state_lib
from sgt_jax.train import step as step_lib
from tests.sharding.fake_batches import make_batch, small_config

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]  # two step compiles: the 3.11 leg only


def _config(offload: bool):
    cfg = small_config(packs=2, latents="cached")
    cfg.train.ema_decay = 0.9
    cfg.train.ema_offload = offload
    cfg.train.opt_offload = offload
    # a clip that binds (the gradient norm of the tiny model is far above 1e-3), weight decay on, bf16 mu,
    # a warm-up so the schedule's count matters, and a learning rate that moves the parameters
    cfg.optim.update(dict(warmup_steps=3, lr=0.1, clip_norm=1e-3, weight_decay=0.1, mu_dtype="bfloat16"))
    cfg.mesh.shape = (1, 2, 1)
    return cfg


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _kinds(tree):
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def runs():
    out = {}
    init = None
    for offload in (False, True):
        cfg = _config(offload)
        mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:2])
        spec, jitted, _ = step_lib.build(cfg, mesh)
        if init is None:
            init = _host(state_lib.init_state(cfg, spec))
        state = jax.device_put(init, spec.shardings)
        rules = parallel.logical_rules(cfg)
        hosts, metrics = [_host(state)], []  # the step donates its input state: read each one at once
        bad = make_batch(cfg, seed=2)
        bad["latent_mean"] = bad["latent_mean"].copy()
        bad["latent_mean"][0, 0, 0] = np.nan
        for batch in (make_batch(cfg, seed=0), make_batch(cfg, seed=1), bad):
            state, m = jitted(state, parallel.to_global(batch, mesh, rules))
            hosts.append(_host(state))
            metrics.append(_host(m))
        out[offload] = dict(spec=spec, final=state, host=hosts, metrics=metrics)
    return out


def test_offloaded_parts_live_in_host_memory(runs):
    spec, state = runs[True]["spec"], runs[True]["final"]
    assert any(spec.stacked) and not all(spec.stacked)  # both kinds of leaf take part
    adam = state["opt"][-1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert _kinds(adam.mu) == _kinds(adam.nu) == _kinds(state["ema"]) == {"pinned_host"}
    assert _kinds(state["params"]) == {"device"} and adam.count.sharding.memory_kind == "device"
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {np.dtype("bfloat16")}
    plain = runs[False]["final"]
    assert _kinds(plain["opt"][-1][0].mu) == _kinds(plain["ema"]) == {"device"}


def test_layerwise_update_equals_the_device_update(runs):
    dev, off = runs[False], runs[True]
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(dev["host"][0]["params"]), jax.tree.leaves(dev["host"][2]["params"])))
    assert moved > 1e-3  # two updates moved the parameters well beyond the tolerance below
    for m_dev, m_off in zip(dev["metrics"][:2], off["metrics"][:2]):
        assert bool(m_dev["applied"]) and bool(m_off["applied"])
        assert float(m_dev["grad_norm"]) > 1e-2  # the clip at 1e-3 binds
        for k in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(m_off[k], m_dev[k], rtol=1e-6, err_msg=k)
    for i in (1, 2):
        for part in ("params", "opt", "ema"):
            a_leaves = jax.tree_util.tree_leaves_with_path(dev["host"][i][part])
            for (path, a), b in zip(a_leaves, jax.tree.leaves(off["host"][i][part])):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=1e-6,
                                           atol=1e-6 * (float(np.max(np.abs(a.astype(np.float32)))) + 1e-12),
                                           err_msg=f"step {i} {part}{jax.tree_util.keystr(path)}")
    counts = [int(x) for x in jax.tree.leaves(off["host"][2]["opt"]) if np.ndim(x) == 0]
    assert counts and set(counts) == {2}  # Adam's and the schedule's counts advanced once per step


def test_nonfinite_step_keeps_the_offloaded_state(runs):
    off = runs[True]
    m = off["metrics"][2]
    assert not bool(m["applied"]) and int(m["skipped"]) == 1
    for part in ("params", "opt", "ema"):
        for a, b in zip(jax.tree.leaves(off["host"][2][part]), jax.tree.leaves(off["host"][3][part])):
            np.testing.assert_array_equal(a, b, err_msg=part)
    assert _kinds(off["final"]["ema"]) == {"pinned_host"}
