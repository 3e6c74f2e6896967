"""The train state: a plain dict of pytrees, its shardings, and how it is created.

    state = {
      "step":      int32 []            data steps taken (advances even when an update is skipped)
      "params":    nnx.State           trainable parameters, fp32 masters
      "frozen":    nnx.State           frozen parameters (VAE + frozen groups): never updated
      "opt":       optax state         over "params" only (Adam moments shard like the params; optional
                                       host offload of the moments, config.train.opt_offload)
      "ema":       nnx.State | absent  EMA of "params" (config.train.ema_dtype; optional host offload)
      "rng":       uint32 [2]          base key; step s uses fold_in(rng, s), so resumes are exact
      "nonfinite": int32 []            consecutive skipped (NaN/Inf) steps
      "skipped":   int32 []            total skipped steps
    }

Why a dict of nnx.States and not an nnx.Optimizer: the jitted step is a pure function of pytrees
with explicit in/out shardings and donation, and the checkpoint writes each part
as its own item (sgt_jax/checkpoint/store.py). No process ever holds the full model: the state is
built by ``jax.jit(init, out_shardings=...)`` from an abstract (``nnx.eval_shape``) description.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgt_jax import parallel
from sgt_jax.checkpoint import store
from sgt_jax.train.freeze import frozen_groups, make_filters
from sgt_jax.train.optim import chain_parts, optimizer_parts

SCALARS = ("step", "rng", "nonfinite", "skipped")


def latents_online(config) -> bool:
    """True when the step encodes ``vae_images`` itself (the model, and so its checkpoints, hold the frozen
    VAE); False for cached latent statistics (``config.data.latents = "cached"``: no VAE in the model)."""
    return str(config.data.latents) == "online"


def default_model_fn(config) -> Callable[[nnx.Rngs], nnx.Module]:
    """The family's model (Bagel or OmniGen2) built from ``config.model``; the VAE is included only for
    online latent encoding."""
    from sgt_jax.train.family import model_fn

    return model_fn(config, with_vae=latents_online(config))


@dataclasses.dataclass
class StateSpec:
    """Everything static about the train state of one run (built once, shared by init/step/restore)."""

    graphdef: Any
    rest: Any  # non-Param variables of the model (must stay empty for Bagel)
    abstract: dict  # ShapeDtypeStructs with shardings
    shardings: dict
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    model_fn: Callable
    filters: tuple
    ema_dtype: Any
    use_ema: bool
    stacked: tuple  # per leaf of "params" (jax.tree.leaves order): stacked over the layers (first axis "layers")
    # Host-memory offload (sgt_jax/train/offload.py updates these parts layer by layer): the EMA, Adam's
    # moments; the optimizer apart (tx = chain_parts(clip_norm, inner_tx)) for the layer-by-layer update.
    ema_offload: bool
    opt_offload: bool
    clip_norm: float
    inner_tx: optax.GradientTransformation


def _offload_kind(config, mesh: Mesh, key: str) -> str | None:
    """``"pinned_host"`` when ``config.train.<key>`` asks to keep a part of the state in host memory."""
    if not bool(config.train[key]):
        return None
    kinds = {m.kind for d in mesh.devices.flat for m in d.addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(
            f"config.train.{key}=True needs 'pinned_host' device memory; the {jax.default_backend()!r} "
            f"backend offers {sorted(kinds)}. Set --config.train.{key}=False.")
    v4 = sorted({d.device_kind for d in mesh.devices.flat if "v4" in str(d.device_kind).lower()})
    if v4:
        # The offloaded state is updated by loops that read one layer's slice from host memory
        # (sgt_jax/train/offload.py). For the 7B step the TPU v4 compiler (libtpu 0.0.42.1) aborts the
        # whole process on them ("Strided host DMA (non iova) is not supported"), where v5p and v5e compile
        # them; a tiny model compiles on v4, so it depends on the shapes. Refused on v4 rather than let a
        # run die at its first compile.
        raise ValueError(
            f"config.train.{key}=True is not supported on {v4[0]}: for BAGEL-7B the TPU v4 compiler aborts on "
            f"the layer-by-layer host-memory reads of the offloaded update (bench/results/compile.md). Set "
            f"--config.train.{key}=False (on v4 use smaller packs or more chips instead).")
    return "pinned_host"


def _moments_to(shardings, memory_kind: str | None):
    """The optimizer state's shardings with its per-parameter leaves (Adam's mu and nu, which carry the
    params' Variable metadata) in ``memory_kind``; the step counts stay on the device."""
    if memory_kind is None:
        return shardings
    return jax.tree.map(lambda x: x.replace(x.get_value().with_memory_kind(memory_kind)) if _is_var(x) else x,
                        shardings, is_leaf=_is_var)


def _stacked(train) -> tuple:
    return tuple((parallel.variable_logical_names(v) or (None,))[:1] == ("layers",)
                 for v in jax.tree.leaves(train, is_leaf=_is_var))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _split(module, filters):
    graphdef, train, frozen, rest = nnx.split(module, *filters, ...)
    return graphdef, train, frozen, rest


def make_state_spec(config, mesh: Mesh, model_fn: Callable | None = None) -> StateSpec:
    """Abstract train state (ShapeDtypeStructs carrying shardings) and its shardings."""
    model_fn = model_fn or default_model_fn(config)
    rules = parallel.logical_rules(config)
    filters = make_filters(config)
    clip_norm, inner_tx, schedule = optimizer_parts(config.optim, int(config.train.steps))
    tx = chain_parts(clip_norm, inner_tx)
    with nnx.use_eager_sharding(False):
        abstract_module = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    graphdef, train, frozen, rest = _split(abstract_module, filters)
    if jax.tree.leaves(rest):
        raise ValueError(f"the model has non-Param state the train step does not handle: {rest}")
    if not jax.tree.leaves(train):
        raise ValueError("config.train.freeze freezes every parameter: nothing to train")
    opt = jax.eval_shape(tx.init, train)
    ema_dtype = jnp.dtype(str(config.train.ema_dtype))
    use_ema = float(config.train.ema_decay) > 0
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {
        "params": parallel.state_shardings(train, mesh, rules),
        "frozen": parallel.state_shardings(frozen, mesh, rules),
        "opt": _moments_to(parallel.state_shardings(opt, mesh, rules), _offload_kind(config, mesh, "opt_offload")),
        "step": replicated, "rng": replicated, "nonfinite": replicated, "skipped": replicated,
    }
    shapes = {
        "params": train, "frozen": frozen, "opt": opt,
        "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        "nonfinite": jax.ShapeDtypeStruct((), jnp.int32), "skipped": jax.ShapeDtypeStruct((), jnp.int32),
    }
    if use_ema:
        shardings["ema"] = parallel.state_shardings(train, mesh, rules,
                                                    memory_kind=_offload_kind(config, mesh, "ema_offload"))
        shapes["ema"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, ema_dtype), train)
    abstract = {k: parallel.abstract_with_shardings(shapes[k], shardings[k]) for k in shapes}
    return StateSpec(graphdef, rest, abstract, shardings, tx, schedule, model_fn, filters, ema_dtype, use_ema,
                     _stacked(train), use_ema and bool(config.train.ema_offload), bool(config.train.opt_offload),
                     clip_norm, inner_tx)


def _assemble(spec: StateSpec, train, frozen, seed: int) -> dict:
    state = {
        "step": jnp.zeros((), jnp.int32), "params": train, "frozen": frozen, "opt": spec.tx.init(train),
        "rng": jax.random.PRNGKey(seed), "nonfinite": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32),
    }
    if spec.use_ema:
        state["ema"] = jax.tree.map(lambda x: x.astype(spec.ema_dtype), train)
    return state


def init_state(config, spec: StateSpec) -> dict:
    """A fresh (randomly initialised) train state, created directly in its shardings."""
    seed = int(config.train.seed)

    def init():
        with nnx.use_eager_sharding(False):
            module = spec.model_fn(nnx.Rngs(seed))
        _, train, frozen, _ = _split(module, spec.filters)
        return _assemble(spec, train, frozen, seed)

    return jax.jit(init, out_shardings=spec.shardings)()


def full_param_target(spec: StateSpec) -> dict:
    """Abstract nested dict (ShapeDtypeStructs with shardings) of ALL model parameters, in the layout
    of ``nnx.state(model, nnx.Param).to_pure_dict()`` (what imported workdirs hold)."""
    model = nnx.merge(spec.graphdef, spec.abstract["params"], spec.abstract["frozen"], spec.rest)
    return nnx.state(model, nnx.Param).to_pure_dict()


def state_from_params(config, spec: StateSpec, full_params: dict) -> dict:
    """A train state whose parameters AND EMA start from ``full_params`` (a pure dict of all model
    parameters, already sharded), with a fresh optimizer — the SGT init (song2yu/SGT `BAGEL/shells/train_sgt.sh`)."""
    seed = int(config.train.seed)
    frozen = frozen_groups(config)

    def build(pure):
        # Functional rebuild (new Variables), never a mutation of the captured abstract state.
        train_p, frozen_p = store.split_pure(pure, frozen)
        train = store.from_nested(store.to_nested(train_p), spec.abstract["params"])
        fro = store.from_nested(store.to_nested(frozen_p), spec.abstract["frozen"])
        return _assemble(spec, train, fro, seed)

    return jax.jit(build, out_shardings=spec.shardings)(full_params)


def full_params_from_state(spec: StateSpec, state: dict, weights: str = "raw") -> dict:
    """Pure dict of all model parameters from a train state: ``raw`` params or the ``ema`` copy (frozen
    parameters are taken as they are)."""
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
    train = state["params"]
    if weights == "ema":
        if "ema" not in state:
            raise ValueError("this run keeps no EMA (config.train.ema_decay = 0)")
        train = jax.tree.map(lambda e, p: e.astype(p.dtype), state["ema"], state["params"])
    model = nnx.merge(spec.graphdef, train, state["frozen"], spec.rest)
    return nnx.state(model, nnx.Param).to_pure_dict()
