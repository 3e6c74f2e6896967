"""Updates of train state kept in host memory, one layer at a time.

``config.train.ema_offload`` keeps the EMA, and ``config.train.opt_offload`` keeps Adam's moments (mu, nu),
in ``pinned_host`` memory between steps. Moving such a tree whole to the device for its update would put
all of it in device memory at the end of the step (the 7B EMA is 13.6 GiB per chip on 4 v5p chips, as
many temporaries as the offload saved in arguments). Here each leaf is updated on its own, and a leaf
stacked over the layers (first logical axis ``"layers"``, the scanned stacks) by a ``fori_loop`` over
that axis: each iteration reads one layer's slice from host memory, moves it to the device, updates it,
moves it back and writes it into the array the loop carries, so at most one layer's slice of one leaf is
on the device at a time and the donated host buffer is updated in place (AOT for v5p: a 28-layer fp32
stack updated whole took 3.5 GiB of device temporaries, layer by layer 0.19 GiB; stacking the loop's
outputs into new arrays instead of carrying them made a second copy of the state in host memory). The
7B numbers are in bench/results/compile.md. The TPU v4 compiler aborts on these loops for the 7B step,
so the state refuses the offload on v4 (sgt_jax/train/state.py).

The optimizer update per slice is optax's own (the same AdamW transformation, called on a tree whose
other leaves are zero-size), so the arithmetic is optax's: the global-norm clip is applied to each slice
with the global norm (optax ``clip_by_global_norm``'s formula), the step count and schedule are advanced
once. A non-finite step keeps every slice (``jnp.where`` on the slice, so nothing is moved back whole).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sgt_jax.train.optim import ema_update


def slice_sharding(s: NamedSharding, memory_kind: str) -> NamedSharding:
    """The sharding of one layer's slice of a leaf sharded by ``s`` (its first axis dropped)."""
    return NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]), memory_kind=memory_kind)


def _per_leaf(fn: Callable, stacked: bool, updated: tuple, read: tuple = ()) -> tuple:
    """``fn(*updated, *read) -> new values of updated``, on whole leaves or, when ``stacked``, layer by
    layer: a loop over the first axis that reads slice ``l`` of every array and writes the new slices
    into the ``updated`` arrays, which are the loop's carry. Carrying them (rather than stacking the
    loop's outputs into new arrays) lets XLA update each array in place, on the device and in host
    memory, so the donated state is not copied."""
    if not stacked:
        return fn(*updated, *read)

    def body(layer, carry):
        take = lambda x: jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)  # noqa: E731
        new = fn(*(take(x) for x in carry), *(take(x) for x in read))
        return tuple(jax.lax.dynamic_update_index_in_dim(c, n, layer, 0) for c, n in zip(carry, new))

    return jax.lax.fori_loop(0, updated[0].shape[0], body, tuple(updated))


def _mover(s: NamedSharding | None, stacked: bool):
    """(to_device, back) for a leaf of sharding ``s``: identities for a leaf that lives on the device."""
    if getattr(s, "memory_kind", None) != "pinned_host":
        return (lambda x: x), (lambda x: x)
    dev = slice_sharding(s, "device") if stacked else s.with_memory_kind("device")
    host = slice_sharding(s, "pinned_host") if stacked else s
    return (lambda x: jax.device_put(x, dev)), (lambda x: jax.device_put(x, host))


def ema_update_layerwise(ema, params, shardings, stacked, decay: float, finite) -> object:
    """``ema <- decay·ema + (1 − decay)·params`` leaf by leaf (layer by layer for stacked leaves), with
    host-resident leaves moved to the device one slice at a time; ``finite`` False keeps the EMA."""
    e_leaves, treedef = jax.tree.flatten(ema)
    p_leaves, s_leaves = jax.tree.leaves(params), jax.tree.leaves(shardings)
    out = []
    for e, p, s, st in zip(e_leaves, p_leaves, s_leaves, stacked):
        to_dev, back = _mover(s, st)

        def one(e_x, p_x, to_dev=to_dev, back=back):
            e_d = to_dev(e_x)
            return (back(jnp.where(finite, ema_update(e_d, p_x, decay), e_d)),)

        out.append(_per_leaf(one, st, (e,), (p,))[0])
    return treedef.unflatten(out)


def _zeros_like_leaf(x):
    return jnp.zeros((0,), x.dtype)


def adam_update_layerwise(inner_tx: optax.GradientTransformation, grads, state, params, *, clip_norm: float,
                          grad_norm, finite, mu_shardings, nu_shardings, stacked):
    """One optimizer update of ``params`` by ``inner_tx`` (the transformation after the clip, holding
    optax's ``ScaleByAdamState``) leaf by leaf and layer by layer. ``state`` is ``inner_tx``'s state, its
    ``mu`` and ``nu`` possibly in host memory (``mu_shardings``/``nu_shardings``). Gradients are clipped
    to ``clip_norm`` by ``grad_norm`` (their global norm; 0 = no clip). Returns ``(params, state)``; with
    ``finite`` False both are returned unchanged."""
    mu, nu = optax.tree_utils.tree_get(state, "mu"), optax.tree_utils.tree_get(state, "nu")
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves, mu_leaves, nu_leaves = jax.tree.leaves(grads), jax.tree.leaves(mu), jax.tree.leaves(nu)
    mu_def, nu_def = jax.tree.structure(mu), jax.tree.structure(nu)
    ms_leaves, ns_leaves = jax.tree.leaves(mu_shardings), jax.tree.leaves(nu_shardings)
    dummy_p = [_zeros_like_leaf(x) for x in p_leaves]
    dummy_m = [_zeros_like_leaf(x) for x in mu_leaves]
    dummy_n = [_zeros_like_leaf(x) for x in nu_leaves]

    def clip(g):
        if not clip_norm:
            return g
        # optax.clip_by_global_norm(clip_norm) on the whole tree, applied to this slice
        return jax.lax.select(grad_norm < clip_norm, g, (g / grad_norm.astype(g.dtype)) * clip_norm)

    # The step count (and schedule count) advance once: from a call on an all-zero-size tree.
    empty = optax.tree_utils.tree_set(state, mu=mu_def.unflatten(dummy_m), nu=nu_def.unflatten(dummy_n))
    _, advanced = inner_tx.update(treedef.unflatten(dummy_p), empty, treedef.unflatten(dummy_p))
    counts = jax.tree.map(lambda new, old: jnp.where(finite, new, old), advanced, empty)

    new_p, new_m, new_n = [], [], []
    for k, (p, g, m, n, st) in enumerate(zip(p_leaves, g_leaves, mu_leaves, nu_leaves, stacked)):
        m_dev, m_back = _mover(ms_leaves[k], st)
        n_dev, n_back = _mover(ns_leaves[k], st)

        def one(p_x, g_x, m_x, n_x, k=k, m_dev=m_dev, m_back=m_back, n_dev=n_dev, n_back=n_back):
            m_d, n_d = m_dev(m_x), n_dev(n_x)
            only = lambda dummies, x: dummies[:k] + [x] + dummies[k + 1:]  # noqa: E731
            sub = optax.tree_utils.tree_set(state, mu=mu_def.unflatten(only(dummy_m, m_d)),
                                            nu=nu_def.unflatten(only(dummy_n, n_d)))
            p_tree = treedef.unflatten(only(dummy_p, p_x))
            updates, out = inner_tx.update(treedef.unflatten(only(dummy_p, clip(g_x))), sub, p_tree)
            p_new = jax.tree.leaves(optax.apply_updates(p_tree, updates))[k]
            m_new = jax.tree.leaves(optax.tree_utils.tree_get(out, "mu"))[k]
            n_new = jax.tree.leaves(optax.tree_utils.tree_get(out, "nu"))[k]
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            return keep(p_new, p_x), m_back(keep(m_new, m_d)), n_back(keep(n_new, n_d))

        p1, m1, n1 = _per_leaf(lambda p_x, m_x, n_x, g_x, one=one: one(p_x, g_x, m_x, n_x), st, (p, m, n), (g,))
        new_p.append(p1)
        new_m.append(m1)
        new_n.append(n1)
    state = optax.tree_utils.tree_set(counts, mu=mu_def.unflatten(new_m), nu=nu_def.unflatten(new_n))
    return treedef.unflatten(new_p), state
