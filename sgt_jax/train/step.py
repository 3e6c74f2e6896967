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

Gradient accumulation (``config.train.microbatches = K``): the step's batch of ``data.packs_per_batch``
packs is split into K micro-batches (micro-batch j holds packs j, j+K, j+2K, ..., so every device keeps
its own rows) and a ``lax.scan`` adds their gradients into an fp32 accumulator, then ONE update follows.
The flow-matching noise is drawn for the whole batch and the loss of each micro-batch is its per-token
sums over the WHOLE batch's token counts, so the K micro-batches' losses and gradients add up to the
whole batch's (tests/unit/test_train_accum.py). Activation memory is that of one micro-batch.
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
from sgt_jax.train.family import loss_hooks
from sgt_jax.train import offload
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
    rules = parallel.logical_rules(config) if mesh is not None else None
    hooks = loss_hooks(config)  # the family's noise draws, loss normalisers and loss (sgt_jax/train/family.py)
    decay = float(config.train.ema_decay)
    if spec.opt_offload:
        inner_shardings = spec.shardings["opt"][-1]  # the AdamW state (optim.chain_parts puts it last)
        mu_shardings = optax.tree_utils.tree_get(inner_shardings, "mu")
        nu_shardings = optax.tree_utils.tree_get(inner_shardings, "nu")

    k_micro = microbatches(config)

    def loss_fn(params, frozen, batch, noise, counts):
        model = nnx.merge(spec.graphdef, params, frozen, spec.rest)
        if mesh is None:
            return hooks.loss(model, batch, noise, counts)
        with activation_sharding(lambda x, names: parallel.constrain(x, names, rules, mesh)), \
                sharded_kernels(mesh, lambda names, shape: parallel.logical_to_spec(names, shape, rules, mesh)):
            return hooks.loss(model, batch, noise, counts)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def split(tree):
        """[B, ...] -> [K, B/K, ...], micro-batch j = packs j, j+K, ... (each device keeps its rows)."""
        def one(x):
            y = x.reshape((x.shape[0] // k_micro, k_micro) + x.shape[1:]).swapaxes(0, 1)
            names = (None, "batch") + (None,) * (y.ndim - 2)
            return y if mesh is None else parallel.constrain(y, names, rules, mesh)
        return jax.tree.map(one, tree)

    def loss_and_grads(params, frozen, batch, key):
        noise = hooks.noise(key, batch)
        counts = hooks.counts(batch)
        if k_micro == 1:
            return grad_fn(params, frozen, batch, noise, counts)

        def body(acc, xs):
            (loss, aux), grads = grad_fn(params, frozen, *xs, counts)
            acc_loss, acc_ce, acc_mse, acc_g = acc
            acc_g = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_g, grads)
            return (acc_loss + loss, acc_ce + aux["ce"], acc_mse + aux["mse"], acc_g), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if mesh is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, spec.shardings["params"])
        scalar = jnp.zeros((), jnp.float32)
        (loss, ce, mse, grads), _ = jax.lax.scan(body, (scalar, scalar, scalar, zeros), split((batch, noise)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return (loss, dict(ce=ce, mse=mse, n_ce=counts[0], n_mse=counts[1])), grads

    def step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        (loss, aux), grads = loss_and_grads(state["params"], state["frozen"], batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        if spec.opt_offload:  # leaf by leaf, layer by layer, the moments moved from and back to host memory
            params, inner = offload.adam_update_layerwise(
                spec.inner_tx, grads, state["opt"][-1], state["params"], clip_norm=spec.clip_norm, grad_norm=grad_norm,
                finite=finite, mu_shardings=mu_shardings, nu_shardings=nu_shardings, stacked=spec.stacked)
            opt = tuple(state["opt"][:-1]) + (inner,)
        else:
            def apply(operands):
                params, opt = operands
                updates, opt = spec.tx.update(grads, opt, params)
                return optax.apply_updates(params, updates), opt

            params, opt = jax.lax.cond(finite, apply, lambda operands: operands, (state["params"], state["opt"]))
        ema = state.get("ema")
        if ema is not None and spec.ema_offload:
            ema = offload.ema_update_layerwise(ema, params, spec.shardings["ema"], spec.stacked, decay, finite)
        elif ema is not None:
            ema = jax.lax.cond(finite, lambda e: ema_update(e, params, decay), lambda e: e, ema)
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


def microbatches(config) -> int:
    """``config.train.microbatches`` (K >= 1), checked against ``config.data.packs_per_batch``."""
    k, packs = int(config.train.microbatches), int(config.data.packs_per_batch)
    if k < 1 or packs % k:
        raise ValueError(f"config.train.microbatches={k} must be >= 1 and divide config.data.packs_per_batch="
                         f"{packs} (the global packs of one step, split into K micro-batches)")
    return k


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
    k, shards = microbatches(config), parallel.batch_shards(mesh, rules)
    if (int(config.data.packs_per_batch) // k) % shards:
        raise ValueError(f"a micro-batch of config.data.packs_per_batch / config.train.microbatches = "
                         f"{int(config.data.packs_per_batch)} / {k} packs does not split over the {shards} batch "
                         f"shards of mesh {dict(mesh.shape)}")
    batch_sharding = parallel.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(make_step_fn(config, spec, mesh), in_shardings=(spec.shardings, batch_sharding),
                     out_shardings=(spec.shardings, replicated), donate_argnums=(0,))
    return spec, jitted, batch_sharding
