"""The training loop in-process with the EMA kept in host memory and a PyTorch export at the end.

* ``train.ema_offload=True``: the EMA lives in ``pinned_host`` memory between steps, and its arithmetic
  (``decay·ema + (1 − decay)·params``) is the same as on the device; with ``train.opt_offload=True``
  Adam's moments live there too, through the loop's checkpoints and export.
* ``checkpoint.export_at_end="ema"``: after the last step the loop writes a BAGEL folder, byte-identical
  to what ``--mode export`` writes from the final checkpoint.
"""

import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from sgt_jax import parallel
from sgt_jax.checkpoint import convert
from sgt_jax.mode_args import ModeArgs
from sgt_jax.train import loop
from sgt_jax.train import state as state_lib
from sgt_jax.train import step as step_lib
from tests.sharding.fake_batches import FakeIterator, make_batch, small_config

pytestmark = pytest.mark.slow


def _config(steps: int = 2):
    # the loop meshes all devices (8 fake CPU devices when the suite runs multidevice tests): a pack each
    cfg = small_config(packs=max(2, jax.device_count()), latents="cached")
    cfg.train.ema_decay = 0.9
    cfg.train.ema_offload = True
    cfg.train.opt_offload = True
    cfg.optim.warmup_steps = 0
    cfg.train.steps, cfg.checkpoint.every = steps, steps
    return cfg


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_ema_offload_stays_on_host_and_matches_the_formula():
    cfg = _config()
    mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    spec, jitted, _ = step_lib.build(cfg, mesh)
    state = jax.device_put(state_lib.init_state(cfg, spec), spec.shardings)
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state["ema"])}
    assert kinds == {"pinned_host"}
    before = _host(state)
    rules = parallel.logical_rules(cfg)
    for seed in range(2):
        state, metrics = jitted(state, parallel.to_global(make_batch(cfg, seed=seed), mesh, rules))
        assert bool(metrics["applied"])
        assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state["ema"])} == {"pinned_host"}
        assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state["opt"][-1][0].mu)} == {"pinned_host"}
        after = _host(state)
        for e0, e1, p1 in zip(jax.tree.leaves(before["ema"]), jax.tree.leaves(after["ema"]),
                              jax.tree.leaves(after["params"])):
            np.testing.assert_allclose(e1, 0.9 * e0 + 0.1 * p1, rtol=1e-5, atol=1e-7)
        before = after
    assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state["params"])} == {"device"}


def test_export_at_end_without_a_vae_source_is_refused_before_training(tmp_path):
    cfg = _config()  # cached latents: the checkpoints hold no VAE, and init_from is empty
    cfg.checkpoint.export_at_end = "ema"
    with pytest.raises(ValueError, match="keeps no VAE"):
        loop.run(cfg, ModeArgs(workdir=str(tmp_path / "run")), iterator_fn=FakeIterator)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_export_at_end_equals_export_mode(tmp_path):
    cfg = _config()
    cfg.data.latents = "online"  # the model (and so every checkpoint) holds the frozen VAE
    cfg.checkpoint.export_at_end = "ema"
    workdir = str(tmp_path / "run")
    assert loop.run(cfg, ModeArgs(workdir=workdir), iterator_fn=FakeIterator) == 0
    at_end = os.path.join(workdir, "export")
    files = sorted(os.listdir(at_end))
    assert "ema.safetensors" in files, files

    on_demand = str(tmp_path / "on_demand")
    assert convert.run_export(cfg, ModeArgs(workdir=workdir, dest=on_demand, step=2, weights="ema")) == 0
    for name in ("ema.safetensors", "ae.safetensors"):
        x, y = load_file(os.path.join(at_end, name)), load_file(os.path.join(on_demand, name))
        assert x.keys() == y.keys() and len(x) > 50, name
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), (name, k)
    a = load_file(os.path.join(at_end, "ema.safetensors"))

    raw = str(tmp_path / "raw")
    assert convert.run_export(cfg, ModeArgs(workdir=workdir, dest=raw, step=2, weights="raw")) == 0
    r = load_file(os.path.join(raw, "ema.safetensors"))
    moved = [k for k in a if a[k].tobytes() != r[k].tobytes()]
    assert moved, "the EMA export should differ from the raw weights after 2 updates with decay 0.9"


def test_init_from_a_bagel_folder_and_export_at_end_with_its_vae(tmp_path):
    """Train straight from a BAGEL PyTorch folder with cached latents (no VAE in the checkpoints): the
    export at the end takes the frozen VAE from that folder, and with EMA 0.9999 the exported EMA is
    still the folder's weights to bf16 rounding, under the folder's exact key set."""
    from tests.fixtures.bagel_folder import write_bagel_folder

    cfg = _config()
    cfg.train.ema_decay = 0.9999
    cfg.train.ema_offload = cfg.train.opt_offload = False
    folder = write_bagel_folder(str(tmp_path / "bagel"), cfg.model, seed=5)
    cfg.checkpoint.init_from = folder
    cfg.checkpoint.export_at_end = "ema"
    workdir = str(tmp_path / "run")
    assert loop.run(cfg, ModeArgs(workdir=workdir), iterator_fn=FakeIterator) == 0
    out = os.path.join(workdir, "export")
    ae_src, ae_out = load_file(os.path.join(folder, "ae.safetensors")), load_file(os.path.join(out, "ae.safetensors"))
    assert ae_src.keys() == ae_out.keys()
    for k in ae_src:
        assert ae_src[k].tobytes() == ae_out[k].tobytes(), k
    src, got = load_file(os.path.join(folder, "ema.safetensors")), load_file(os.path.join(out, "ema.safetensors"))
    assert src.keys() == got.keys()
    for k in src:
        a, b = src[k].astype(np.float32), got[k].astype(np.float32)
        np.testing.assert_allclose(b, a, atol=1e-2 * (np.abs(a).max() + 1e-6), err_msg=k)


def test_resume_with_the_state_in_host_memory_is_exact(tmp_path):
    """One step, a restart, two more == three uninterrupted steps, with the EMA and Adam's moments in host
    memory: step 3's loss depends on the update of step 2, which used the moments restored from step 1's
    checkpoint into pinned_host memory."""
    from tests.run_helpers import read_metrics

    def run(workdir, steps):
        cfg = _config(steps=3)
        cfg.train.steps, cfg.checkpoint.every = steps, 1
        assert loop.run(cfg, ModeArgs(workdir=str(workdir)), iterator_fn=FakeIterator) == 0
        return read_metrics(workdir)

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "split", 1)
    split = run(tmp_path / "split", 3)
    keys = ("loss", "ce", "mse", "grad_norm", "batch_crc")
    assert [m["step"] for m in split] == [m["step"] for m in whole] == [1, 2, 3]
    for a, b in zip(whole, split):
        assert tuple(a[k] for k in keys) == tuple(b[k] for k in keys), (a, b)
    assert whole[2]["loss"] != whole[1]["loss"]
