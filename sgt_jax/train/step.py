"""The pure, jitted SGT train step and its builder (what the loop runs and compile mode lowers).

    step_fn, abstract_state, batch_sharding = build_train_step(config, mesh)
    state, metrics = step_fn(state, global_batch)

``step_fn`` is ``jax.jit`` with explicit in/out shardings and the state donated. Compile mode
(sgt_jax/compile.py) lowers it with ``abstract_state`` and batch ShapeDtypeStructs carrying
``batch_sharding``: ``step_fn.lower(abstract_state, abstract_batch).compile()``.

Inside the step: per-step key ``fold_in(rng, step)`` -> flow-matching inputs -> forward -> loss
(sgt_jax/train/losses.py) -> gradient w.r.t. the trainable parameters only -> global grad norm ->
if loss and grad norm are finite: clip + AdamW update + EMA, else keep params/opt/EMA unchanged and
count the skip (``lax.cond``, so a skipped step costs no update arithmetic). The step counter always
advances (the batch was consumed), the optimizer's own count only on applied updates.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgt_jax import parallel
from sgt_jax.models.layers import activation_sharding, sharded_kernels
from sgt_jax.train.losses import sgt_loss
from sgt_jax.train.optim import ema_update
from sgt_jax.train.state import StateSpec, make_state_spec

METRIC_KEYS = ("loss", "ce", "mse", "n_ce", "n_mse", "grad_norm", "lr", "applied", "nonfinite", "skipped")


def make_step_fn(config, spec: StateSpec, mesh: Mesh | None = None) -> Callable:
    """The un-jitted step ``(state, batch) -> (state, metrics)``.

    With ``mesh``, the model's activation constraints (logical names such as ``("batch", "seq",
    "act_embed")``, sgt_jax/models/layers.py ``constrain``) are mapped through ``config.mesh.rules`` onto
    it while the step is traced. Without them the partitioner is free to pick any activation layout, and
    on an FSDP mesh it picked a replicated batch with weights kept split along ``embed`` (measured on a
    v6e-64 compile: every device held the whole global batch's activations, 39 GiB of temporaries with
    only 4 layers); see docs/compile_and_flops.md."""
    train_cfg, model_cfg = config.train, config.model
    rules = parallel.logical_rules(config) if mesh is not None else None
    num_images = int(config.data.pack.vae_images)
    decay = float(train_cfg.ema_decay)
    ema_device = None
    if spec.use_ema:
        ema_device = jax.tree.map(lambda s: s.with_memory_kind("device") if s.memory_kind == "pinned_host" else None,
                                  spec.shardings["ema"])

    def loss_fn(params, frozen, batch, key):
        model = nnx.merge(spec.graphdef, params, frozen, spec.rest)
        if mesh is None:
            return sgt_loss(model, batch, key, train_cfg, model_cfg, num_images)
        with activation_sharding(lambda x, names: parallel.constrain(x, names, rules, mesh)), \
                sharded_kernels(mesh, lambda names, shape: parallel.logical_to_spec(names, shape, rules, mesh)):
            return sgt_loss(model, batch, key, train_cfg, model_cfg, num_images)

    def step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["frozen"], batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(operands):
            params, opt, ema = operands
            updates, opt = spec.tx.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
            if ema is not None:
                if ema_device is not None:
                    ema = jax.tree.map(lambda e, s: e if s is None else jax.device_put(e, s), ema, ema_device)
                ema = ema_update(ema, params, decay)
            return params, opt, ema

        def skip(operands):
            params, opt, ema = operands
            if ema is not None and ema_device is not None:
                ema = jax.tree.map(lambda e, s: e if s is None else jax.device_put(e, s), ema, ema_device)
            return params, opt, ema

        params, opt, ema = jax.lax.cond(finite, apply, skip, (state["params"], state["opt"], state.get("ema")))
        new = dict(state)
        new.update(params=params, opt=opt, step=state["step"] + 1,
                   nonfinite=jnp.where(finite, 0, state["nonfinite"] + 1).astype(jnp.int32),
                   skipped=(state["skipped"] + jnp.where(finite, 0, 1)).astype(jnp.int32))
        if ema is not None:
            new["ema"] = ema
        opt_count = state["step"] - state["skipped"]  # updates applied before this one
        metrics = dict(loss=loss, ce=aux["ce"], mse=aux["mse"], n_ce=aux["n_ce"], n_mse=aux["n_mse"],
                       grad_norm=grad_norm, lr=spec.schedule(opt_count), applied=finite,
                       nonfinite=new["nonfinite"], skipped=new["skipped"])
        return new, metrics

    return step


def build_train_step(config, mesh: Mesh, model_fn: Callable | None = None):
    """``(jitted_step, abstract_state, batch_sharding)`` for ``config`` on ``mesh`` (compile mode's entry).

    ``model_fn(rngs) -> nnx.Module`` overrides the model (tests)."""
    spec, jitted, batch_sharding = build(config, mesh, model_fn)
    return jitted, spec.abstract, batch_sharding


def build(config, mesh: Mesh, model_fn: Callable | None = None, spec: StateSpec | None = None):
    """``(spec, jitted_step, batch_sharding)``: like build_train_step, plus the StateSpec the loop needs
    to create or restore the state."""
    spec = spec or make_state_spec(config, mesh, model_fn)
    rules = parallel.logical_rules(config)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(make_step_fn(config, spec, mesh), in_shardings=(spec.shardings, batch_sharding),
                     out_shardings=(spec.shardings, replicated), donate_argnums=(0,))
    return spec, jitted, batch_sharding
