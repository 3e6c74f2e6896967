"""Load a BAGEL model for inference from a workdir, straight into its shardings.

Where the weights come from (first that exists):
  1. ``<workdir>/checkpoints/<step>``: a training checkpoint; ``--step`` picks one (default latest),
     ``--weights ema|raw`` which copy (``store.load_for_inference``); a run trained on cached latents
     keeps no VAE, which then comes from ``config.checkpoint.init_from``'s imported parameters (that
     restore reads the whole imported tree once and keeps only the VAE);
  2. ``<workdir>/params``: imported (or saved) parameters (``store.load_params``);
  3. ``config.checkpoint.init_from`` naming a workdir with (2).
Anything else is an error naming the paths tried. Nothing is materialised on one host: the model is
built abstractly (``nnx.eval_shape``), every parameter gets the NamedSharding its logical axis names map
to under ``config.mesh.rules``, and Orbax restores each shard onto its device.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from sgt_jax.checkpoint import store
from sgt_jax.models.bagel import abstract_bagel, abstract_params
from sgt_jax.parallel.mesh import logical_rules, make_mesh
from sgt_jax.train.family import family


COMPUTE_FIELDS = ("dtype", "param_dtype", "attention_impl", "attention_chunk", "remat_policy", "scan_layers")


def abstract_model_and_params(config):
    """(abstract model, pure-dict of ShapeDtypeStructs with shardings, mesh): a Bagel, or the OmniGen2
    assembly (sgt_jax/models/omnigen2.py) when ``config.model.family == "omnigen2"``."""
    mesh = make_mesh(config.mesh)
    if family(config) == "omnigen2":
        from sgt_jax.parallel.sharding import abstract_params_of
        from sgt_jax.train.family import model_fn

        build = lambda: model_fn(config, with_vae=True)(nnx.Rngs(0))  # noqa: E731
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(build)
        return abstract, abstract_params_of(build, mesh=mesh, rules=logical_rules(config)), mesh
    target = abstract_params(config.model, mesh=mesh, rules=logical_rules(config))
    return abstract_bagel(config.model), target, mesh


def with_imported_architecture(config, workdir: str):
    """OmniGen2 params imported with ``--mode import`` carry their architecture in params_meta.json (the
    folder's config.json files): a copy of ``config`` whose ``model.mllm`` / ``model.dit`` / ``model.vae``
    are those (compute settings as imported). Other configs and workdirs: ``config`` unchanged."""
    import copy

    if family(config) != "omnigen2" or not os.path.isdir(os.path.join(workdir, store.PARAMS_DIR)):
        return config
    meta = store.read_params_meta(workdir)
    if meta.get("family") != "omnigen2":
        raise ValueError(f"{os.path.join(workdir, store.PARAMS_DIR)} holds {meta.get('family', 'BAGEL')!r} "
                         "parameters, the config is an OmniGen2 one (config.model.family)")
    from sgt_jax.checkpoint.omnigen2_folder import configs_from_meta

    cfg_dit, cfg_vae, cfg_mllm = configs_from_meta(meta)
    out = copy.deepcopy(config)
    with out.unlocked():
        run = out.model
        for imported, ours in ((cfg_mllm, run.mllm), (cfg_dit, run.dit)):  # compute settings: the run config's
            for k in COMPUTE_FIELDS:
                imported[k] = ours[k]
        cfg_mllm.min_pixels, cfg_mllm.max_pixels = run.mllm.min_pixels, run.mllm.max_pixels  # image processor
        run.mllm, run.dit, run.vae = cfg_mllm, cfg_dit, cfg_vae
    return out


def inference_config(config, workdir: str):
    """The config to build the model with for ``load_model(config, workdir)``: unchanged, except for OmniGen2
    weights that come from imported parameters (``with_imported_architecture`` of that workdir)."""
    if _has_training_checkpoints(workdir):
        return config
    init_from = config.checkpoint.init_from
    if not os.path.isdir(os.path.join(workdir, store.PARAMS_DIR)) and init_from:
        workdir = init_from
    return with_imported_architecture(config, workdir)


def random_params(config, seed: int = 0, std: float = 0.05) -> dict:
    """A random pure-dict parameter tree for ``config.model`` (tests, demos): norm scales 1, biases 0,
    other weights N(0, std), drawn with numpy leaf by leaf and placed in each leaf's sharding. No
    model-init compile (the tiny model's jitted init takes minutes on a small CPU).

    Every leaf is built on the host in full: meant for small models only."""
    import numpy as np

    _, target, _ = abstract_model_and_params(config)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            value = np.ones(x.shape, x.dtype)
        elif name == "bias":
            value = np.zeros(x.shape, x.dtype)
        else:
            value = (std * rng.standard_normal(x.shape)).astype(x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree_util.tree_map_with_path(fill, target)


def model_from_params(config, pure: dict):
    """A Bagel of ``config.model`` holding the given pure-dict parameters."""
    abstract, _, _ = abstract_model_and_params(config)
    state = nnx.state(abstract, nnx.Param)
    state.replace_by_pure_dict(pure)
    return nnx.merge(nnx.graphdef(abstract), state)


def ema_note(run_config: dict, step: int) -> str:
    """What the EMA of a checkpoint is: its decay, the steps it has averaged, and the share the starting
    weights still hold in it (``decay ** step``; a warning when that is most of it)."""
    decay = float(run_config["train"]["ema_decay"])
    left = decay ** step
    note = f"; EMA decay {decay} over {step} steps: the starting weights still weigh {left:.2g} in it"
    if left > 0.5:
        note += " (mostly the starting weights: train longer, lower the decay, or load --weights raw)"
    return note


def _resolve_step(workdir: str, step: int | None) -> int:
    manager = store.make_manager(workdir, keep=1_000_000, async_save=False, read_only=True)
    try:
        steps = store.all_steps(manager)
    finally:
        manager.close()
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"--step={step} not in {store.checkpoint_dir(workdir)} (steps: {steps})")
    return step


def _has_training_checkpoints(workdir: str) -> bool:
    d = store.checkpoint_dir(workdir)
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def load_model(config, workdir: str, step: int | None = None, weights: str = "ema"):
    """The Bagel of ``config.model`` with the weights found in ``workdir`` (see the module docstring).

    Returns (model, description of the source). OmniGen2: pass the config through ``inference_config``
    first (the imported architecture)."""
    abstract, target, _ = abstract_model_and_params(config)
    init_from = config.checkpoint.init_from
    if _has_training_checkpoints(workdir):
        step = _resolve_step(workdir, step)
        layout = store.read_json_item(workdir, step, "layout")
        source = f"{store.checkpoint_dir(workdir)} step {step} ({weights})"
        if weights == "ema":
            source += ema_note(store.read_json_item(workdir, step, "config"), step)
        if layout.get("with_vae", True):
            pure = store.load_for_inference(workdir, step, weights, abstract_params=target)
        else:
            # Runs on cached latents keep no VAE: take it from the imported weights the run started from.
            if not init_from or not os.path.isdir(os.path.join(init_from, store.PARAMS_DIR)):
                raise FileNotFoundError(
                    f"checkpoint step {step} in {workdir} has no VAE (trained on cached latents) and "
                    f"config.checkpoint.init_from={init_from!r} names no imported workdir to take it from")
            pure = store.load_for_inference(workdir, step, weights,
                                            abstract_params={k: v for k, v in target.items() if k != "vae"})
            pure["vae"] = store.load_params(init_from, target)["vae"]
            source += f" + VAE from {os.path.join(init_from, store.PARAMS_DIR)}"
    elif step is not None:
        raise FileNotFoundError(f"--step={step} given but {store.checkpoint_dir(workdir)} holds no checkpoints")
    else:
        tried = [os.path.join(workdir, store.PARAMS_DIR)]
        src = workdir
        if not os.path.isdir(tried[0]) and init_from and os.path.isdir(os.path.join(init_from, store.PARAMS_DIR)):
            src = init_from
        if not os.path.isdir(os.path.join(src, store.PARAMS_DIR)):
            if init_from:
                tried.append(os.path.join(init_from, store.PARAMS_DIR))
            raise FileNotFoundError(
                f"no weights to load: no training checkpoints in {store.checkpoint_dir(workdir)} and no "
                f"imported parameters at {' or '.join(tried)} (run --mode import or train first)")
        pure = store.load_params(src, target)
        source = os.path.join(src, store.PARAMS_DIR)
    state = nnx.state(abstract, nnx.Param)
    state.replace_by_pure_dict(pure)
    return nnx.merge(nnx.graphdef(abstract), state), source
