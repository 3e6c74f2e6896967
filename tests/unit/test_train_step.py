"""The real Bagel train step on 8 fake CPU devices: sharded == single device, frozen parameters stay
bitwise, EMA arithmetic through the step, NaN skip, restore from 8 onto 4 devices.

One config and one compiled step per mesh are shared by the tests of this module (compile time
dominates on CPU)."""

import jax
import numpy as np
import pytest

from sgt_jax import parallel
from sgt_jax.train import checkpointing
from sgt_jax.train import state as state_lib
from sgt_jax.train import step as step_lib
from tests.sharding.fake_batches import make_batch, small_config

pytestmark = pytest.mark.multidevice


def _config():
    cfg = small_config(packs=4, latents="cached")
    cfg.train.freeze.vit = True
    cfg.train.freeze.connector = True
    cfg.train.ema_decay = 0.9
    cfg.optim.warmup_steps = 0  # BAGEL's warm-up starts at lr 0: the first update would not move anything
    return cfg


def _mesh(cfg, shape, n):
    cfg = cfg.copy_and_resolve_references()
    cfg.mesh.shape = shape
    return parallel.make_mesh(cfg.mesh, devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def runs():
    cfg = _config()
    out = {}
    init = None
    for name, shape, n in (("one", (1, 1, 1), 1), ("eight", (2, 2, 2), 8)):
        mesh = _mesh(cfg, shape, n)
        spec, jitted, _ = step_lib.build(cfg, mesh)
        if init is None:
            init = state_lib.init_state(cfg, spec)  # jit(init, out_shardings) once; then reshard
        out[name] = dict(mesh=mesh, spec=spec, jitted=jitted, init=jax.device_put(init, spec.shardings))
    out["cfg"] = cfg
    out["batches"] = [make_batch(cfg, seed=s) for s in range(2)]
    return out


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _run(run, cfg, batches, state):
    rules = parallel.logical_rules(cfg)
    metrics = []
    for b in batches:
        state, m = run["jitted"](state, parallel.to_global(b, run["mesh"], rules))
        metrics.append(_host(m))
    return state, metrics


def test_sharded_step_equals_single_device(runs):
    cfg = runs["cfg"]
    # the 8-device params really are sharded
    frac, _ = parallel.replicated_fraction(runs["eight"]["init"]["params"])
    assert frac < 0.25
    s1, m1 = _run(runs["one"], cfg, runs["batches"], jax.tree.map(lambda x: x.copy(), runs["one"]["init"]))
    s8, m8 = _run(runs["eight"], cfg, runs["batches"], jax.tree.map(lambda x: x.copy(), runs["eight"]["init"]))
    for a, b in zip(m1, m8):
        for k in ("loss", "ce", "mse", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
        assert a["n_ce"] == b["n_ce"] and a["n_mse"] == b["n_mse"]
    for a, b in zip(jax.tree.leaves(_host(s1["params"])), jax.tree.leaves(_host(s8["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_frozen_bitwise_ema_and_nan_skip(runs):
    cfg, run = runs["cfg"], runs["eight"]
    rules = parallel.logical_rules(cfg)
    start = jax.tree.map(lambda x: x.copy(), run["init"])
    before = _host(start)
    state, m = run["jitted"](start, parallel.to_global(runs["batches"][0], run["mesh"], rules))
    after = _host(state)
    assert bool(m["applied"]) and int(after["step"]) == 1
    # frozen groups (vit, connector) are bitwise unchanged; trainable ones moved
    assert set(after["frozen"].keys()) == {"vit", "connector"}
    for a, b in zip(jax.tree.leaves(before["frozen"]), jax.tree.leaves(after["frozen"])):
        np.testing.assert_array_equal(a, b)
    moved = {jax.tree_util.keystr(p).removesuffix(".value"): not np.array_equal(a, b) for (p, a), b in zip(
        jax.tree_util.tree_leaves_with_path(before["params"]), jax.tree.leaves(after["params"]))}
    for name in ("['llm']['layers']['und']['q_proj']['kernel']", "['llm']['lm_head']['kernel']",
                 "['llm']['embed_tokens']['embedding']", "['llm2vae']['kernel']"):
        assert moved[name], name
    # llm2vae is zero-initialised, so at step 1 no gradient reaches the gen path (gen expert, vae2llm,
    # time embedder) and Adam leaves them in place; from step 2 on they train.
    assert not moved["['llm']['layers']['gen']['q_proj']['kernel']"]
    # EMA: 0.9 * init + 0.1 * new params
    for e, p0, p1 in zip(jax.tree.leaves(after["ema"]), jax.tree.leaves(before["params"]),
                         jax.tree.leaves(after["params"])):
        np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-5, atol=1e-7)
    # a NaN in the inputs: update skipped, counted; params/opt/EMA unchanged
    bad = dict(runs["batches"][1])
    bad["latent_mean"] = bad["latent_mean"].copy()
    bad["latent_mean"][0, 0, 0] = np.nan
    state2, m2 = run["jitted"](state, parallel.to_global(bad, run["mesh"], rules))
    after2 = _host(state2)
    assert not bool(m2["applied"]) and not np.isfinite(m2["loss"])
    assert (int(after2["step"]), int(after2["nonfinite"]), int(after2["skipped"])) == (2, 1, 1)
    for part in ("params", "opt", "ema", "frozen"):
        for a, b in zip(jax.tree.leaves(after[part]), jax.tree.leaves(after2[part])):
            np.testing.assert_array_equal(a, b, err_msg=part)
    state3, m3 = run["jitted"](state2, parallel.to_global(runs["batches"][1], run["mesh"], rules))
    assert bool(m3["applied"]) and int(m3["nonfinite"]) == 0 and int(m3["skipped"]) == 1


def test_restore_from_8_onto_4_devices(runs, tmp_path):
    from sgt_jax.checkpoint import store

    cfg, run = runs["cfg"], runs["eight"]
    state = run["init"]
    manager = store.make_manager(str(tmp_path), keep=2, async_save=True)
    checkpointing.save_state(manager, state, data_state={"k": 5}, config=cfg, mesh=run["mesh"], force=True)
    store.wait(manager)
    manager.close()
    mesh4 = _mesh(cfg, (1, 4, 1), 4)
    spec4 = state_lib.make_state_spec(cfg, mesh4)
    manager = store.make_manager(str(tmp_path), keep=2)
    restored, data = checkpointing.restore_state(manager, spec4, cfg, mesh4)
    manager.close()
    assert data == {"process_count": 1, "states": [{"k": 5}]}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
        assert a.sharding.mesh.devices.size == 4
    q = restored["params"]["llm"]["layers"]["und"]["q_proj"]["kernel"]
    assert q.sharding.spec == spec4.shardings["params"]["llm"]["layers"]["und"]["q_proj"]["kernel"].value.spec


def test_init_from_imported_workdir_and_load_for_inference(runs, tmp_path):
    from sgt_jax.checkpoint import store

    cfg, run = runs["cfg"].copy_and_resolve_references(), runs["eight"]
    spec, mesh = run["spec"], run["mesh"]
    # an "imported" workdir: all model parameters + params_meta.json (what --mode import writes)
    imported = jax.tree.map(lambda x: x * 0.5 + 1.0, state_lib.full_params_from_state(spec, run["init"]))
    store.save_params(str(tmp_path / "imported"), imported, {"layout": {"scan_layers": True}})
    cfg.checkpoint.init_from = str(tmp_path / "imported")
    state = checkpointing.initial_state(cfg, spec, mesh)
    got = _host(state_lib.full_params_from_state(spec, state))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(_host(imported))):
        np.testing.assert_array_equal(a, b)
    for e, p in zip(jax.tree.leaves(_host(state["ema"])), jax.tree.leaves(_host(state["params"]))):
        np.testing.assert_array_equal(e, p)  # SGT: the imported weights initialise the EMA too
    import optax

    counts = optax.tree_utils.tree_get_all_with_path(state["opt"], "count")
    assert counts and all(int(c) == 0 for _, c in counts)  # a fresh optimizer
    # a training checkpoint read back for inference: raw and EMA weights, frozen parts included
    state = dict(state, ema=jax.tree.map(lambda x: x - 1.0, state["ema"]))
    workdir = str(tmp_path / "train")
    manager = store.make_manager(workdir, keep=2)
    checkpointing.save_state(manager, state, data_state={}, config=cfg, mesh=mesh, force=True)
    store.wait(manager)
    manager.close()
    target = state_lib.full_param_target(spec)
    raw = _host(store.load_for_inference(workdir, weights="raw", abstract_params=target))
    ema = _host(store.load_for_inference(workdir, weights="ema", abstract_params=target))
    np.testing.assert_array_equal(raw["vit"]["patch_embedding"]["kernel"],
                                  _host(imported)["vit"]["patch_embedding"]["kernel"])  # frozen: as imported
    np.testing.assert_array_equal(ema["vit"]["patch_embedding"]["kernel"], raw["vit"]["patch_embedding"]["kernel"])
    np.testing.assert_array_equal(ema["llm2vae"]["kernel"], raw["llm2vae"]["kernel"] - 1.0)


def _constraint_specs(jaxpr, out):
    from sgt_jax.compile import _sub_jaxprs

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            out.append((eqn.invars[0].aval.shape, tuple(eqn.params["sharding"].spec)))
        for sub in _sub_jaxprs(eqn):
            _constraint_specs(sub, out)
    return out


def test_activations_are_split_over_the_batch_axes(runs):
    """The step installs the model's activation constraints on the mesh: the hidden states of every
    layer, the attention q/k/v, the ViT stream and the logits are split over (data, fsdp) along the
    pack axis. Without them the partitioner may replicate the batch (seen on a 64-chip compile: every
    device held the whole global batch's activations)."""
    cfg, run = runs["cfg"], runs["eight"]
    batch = parallel.to_global(runs["batches"][0], run["mesh"], parallel.logical_rules(cfg))
    state = run["init"]
    with_mesh = _constraint_specs(jax.make_jaxpr(step_lib.make_step_fn(cfg, run["spec"], run["mesh"]))(
        state, batch).jaxpr, [])
    batch_split = [shape for shape, spec in with_mesh if spec and spec[0] == ("data", "fsdp")]
    hidden = cfg.model.llm.hidden_size
    assert any(len(s) == 3 and s[-1] == hidden for s in batch_split), with_mesh  # [B, T, H] hidden states
    assert any(len(s) == 4 and s[-1] == cfg.model.llm.head_dim for s in batch_split)  # q/k/v
    assert any(len(s) == 3 and s[-1] == cfg.model.vit.hidden_size for s in batch_split)  # ViT stream
    assert any(len(s) == 3 and s[-1] == cfg.model.llm.vocab_size for s in batch_split)  # logits
    without = _constraint_specs(jax.make_jaxpr(step_lib.make_step_fn(cfg, run["spec"]))(state, batch).jaxpr, [])
    assert not [s for s in without if s[1] and s[1][0] == ("data", "fsdp")]
