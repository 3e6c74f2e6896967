"""The only module that imports Orbax.

Two kinds of checkpoint live in a workdir (docs/interfaces.md §4):
  <workdir>/params/             model parameters (imported weights), an Orbax PyTree, + params_meta.json
  <workdir>/checkpoints/<step>/ training checkpoints (an Orbax CheckpointManager), one item per part:
      params   trainable parameters (fp32 masters)      frozen  frozen parameters (VAE, frozen groups)
      opt      optimizer state                          ema     EMA of the trainable parameters
      scalars  step, RNG key, NaN counters              data    data-iterator state, one JSON per process
      config   the resolved config (JSON)               layout  layout metadata (scan axis, dtypes, mesh)

Every tree goes to disk as a plain nested dict of arrays keyed by path names (``to_nested``), so the
on-disk schema does not depend on Flax/optax classes. Restores always take an abstract target
(ShapeDtypeStructs carrying the *current* shardings), so a checkpoint written on one mesh restores onto any other, and no process materialises
the full model. A step directory that fails to restore (partial write, corrupted file) is reported
with a warning and the previous step is tried (``restore_latest_valid``); once one restores, the broken
newer steps are moved into ``<workdir>/checkpoints_broken/`` so that the run can save them again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from sgt_jax.models.groups import group_of

log = logging.getLogger(__name__)

PARAMS_DIR = "params"
PARAMS_META = "params_meta.json"
CHECKPOINTS_DIR = "checkpoints"
TREE_ITEMS = ("params", "frozen", "opt", "ema", "scalars")
JSON_ITEMS = ("config", "layout")
DATA_ITEM = "data"


# ---------------------------------------------------------------------------------------------------
# Imported parameters (used by the conversion engineer: keep the signatures)
# ---------------------------------------------------------------------------------------------------


def save_params(workdir: str, params: Any, meta: dict) -> str:
    """Write a params PyTree (sharded jax.Arrays) to <workdir>/params and its metadata JSON beside it.

    Every process must call this (Orbax coordinates the multi-host write)."""
    path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, PARAMS_META), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return path


def read_params_meta(workdir: str) -> dict:
    path = os.path.join(workdir, PARAMS_META)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no imported parameters in {workdir!r}: {PARAMS_META} is missing")
    with open(path) as f:
        return json.load(f)


def load_params(workdir: str, abstract_params: Any, *, strict: bool = True) -> Any:
    """Restore <workdir>/params into the shardings carried by ``abstract_params`` (ShapeDtypeStructs).

    ``strict=False`` restores a subset of the saved tree (e.g. a model built without its VAE)."""
    path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no imported parameters in {workdir!r}: {path} does not exist")
    return ocp.StandardCheckpointer().restore(path, abstract_params, strict=strict)


# ---------------------------------------------------------------------------------------------------
# Framework-independent on-disk trees
# ---------------------------------------------------------------------------------------------------


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unsupported pytree key {k!r}")


def _strip_variables(tree: Any) -> Any:
    """Replace Flax Variables by their values (so paths do not carry Variable internals)."""
    return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, tree,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def to_nested(tree: Any) -> dict:
    """A nested dict of the leaves of ``tree`` keyed by their path names (str keys only).

    ``None`` subtrees (e.g. optax EmptyState) vanish; the tree is rebuilt by ``from_nested``."""
    out: dict = {}
    leaves = jax.tree_util.tree_leaves_with_path(_strip_variables(tree))
    for path, leaf in leaves:
        names = [_key_name(k) for k in path]
        if not names:
            raise ValueError("to_nested needs a container at the root, not a bare leaf")
        node = out
        for n in names[:-1]:
            node = node.setdefault(n, {})
            if not isinstance(node, dict):
                raise ValueError(f"path clash at {names}")
        if names[-1] in node:
            raise ValueError(f"duplicate path {names}")
        node[names[-1]] = leaf
    return out


def from_nested(nested: dict, like: Any) -> Any:
    """Rebuild a tree shaped like ``like`` from ``to_nested`` output (leaves looked up by path)."""
    stripped = _strip_variables(like)
    paths = jax.tree_util.tree_leaves_with_path(stripped)
    leaves = []
    for path, _ in paths:
        node = nested
        for k in path:
            name = _key_name(k)
            if not isinstance(node, dict) or name not in node:
                raise KeyError(f"checkpoint has no entry {jax.tree_util.keystr(path)}")
            node = node[name]
        leaves.append(node)
    treedef = jax.tree_util.tree_structure(like, is_leaf=_is_variable)
    # Variables are leaves of ``treedef``: put values back into them.
    like_leaves = jax.tree_util.tree_leaves(like, is_leaf=_is_variable)
    if len(like_leaves) != len(leaves):
        raise ValueError("tree structure mismatch while rebuilding a checkpoint tree")
    rebuilt = [l.replace(v) if _is_variable(l) else v for l, v in zip(like_leaves, leaves)]
    return jax.tree_util.tree_unflatten(treedef, rebuilt)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


# ---------------------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process (like Grain's own handler, but for any dict state)
# ---------------------------------------------------------------------------------------------------


class DataStateHandler(ocp.CheckpointHandler):
    """Writes ``process_<i>-of-<n>.json`` with this process's iterator state; restore reads them all."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(json.dumps(args.state, sort_keys=True))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> dict:
        """Returns ``{"process_count": n, "states": [state of process 0, ..., n-1]}``."""
        files = sorted(epath.Path(directory).glob("process_*-of-*.json"))
        if not files:
            raise FileNotFoundError(f"no data-iterator state files in {directory}")
        counts = {int(f.name.split("-of-")[1][:-5]) for f in files}
        if len(counts) != 1:
            raise ValueError(f"data-iterator state files disagree on the process count: {sorted(counts)}")
        n = counts.pop()
        states = [None] * n
        for f in files:
            states[int(f.name[len("process_"):].split("-of-")[0])] = json.loads(f.read_text())
        if any(s is None for s in states):
            raise FileNotFoundError(f"data-iterator state incomplete in {directory}: {[f.name for f in files]}")
        return {"process_count": n, "states": states}

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ---------------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------------


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))


def make_manager(workdir: str, *, keep: int, async_save: bool = True, read_only: bool = False
                 ) -> ocp.CheckpointManager:
    """A CheckpointManager over <workdir>/checkpoints keeping the ``keep`` newest steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, trees: dict[str, Any], *, data_state: Any,
         config: dict, layout: dict, force: bool = False) -> bool:
    """Start an (async) save of one training step. ``trees`` maps TREE_ITEMS names to pytrees
    (``None`` for an absent part, e.g. no EMA). Every process calls this."""
    items = {}
    for name in TREE_ITEMS:
        tree = trees.get(name)
        if tree is not None and jax.tree.leaves(tree):  # an empty part (e.g. nothing frozen) is not written
            items[name] = ocp.args.StandardSave(to_nested(tree))
    items[DATA_ITEM] = DataStateSave(data_state)
    items["config"] = ocp.args.JsonSave(config)
    items["layout"] = ocp.args.JsonSave(layout)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def wait(manager: ocp.CheckpointManager) -> None:
    manager.wait_until_finished()


def all_steps(manager: ocp.CheckpointManager) -> list[int]:
    return sorted(manager.all_steps())


def restore_step(manager: ocp.CheckpointManager, step: int, targets: dict[str, Any], *,
                 with_data: bool = True) -> dict:
    """Restore ``step`` into abstract ``targets`` (name -> tree of ShapeDtypeStructs with shardings).

    Returns a dict with the same tree items rebuilt in the targets' structure, plus ``config``,
    ``layout`` and (if ``with_data``) ``data`` = {"process_count", "states"}."""
    args = {}
    for name, target in targets.items():
        if target is not None and jax.tree.leaves(target):
            args[name] = ocp.args.StandardRestore(to_nested(target))
    args["config"] = ocp.args.JsonRestore()
    args["layout"] = ocp.args.JsonRestore()
    if with_data:
        args[DATA_ITEM] = DataStateRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    out = {name: from_nested(restored[name] if name in args else {}, t) for name, t in targets.items()
           if t is not None}
    out["config"] = restored["config"]
    out["layout"] = restored["layout"]
    if with_data:
        out[DATA_ITEM] = restored[DATA_ITEM]
    return out


def restore_latest_valid(manager: ocp.CheckpointManager, targets: dict[str, Any], *, with_data: bool = True,
                         step: int | None = None) -> tuple[int | None, dict | None]:
    """Restore the newest step that restores cleanly (or exactly ``step``).

    A step that fails (partially written, truncated or deleted files) is skipped with a warning naming
    the error, and the next older one is tried. Once an older step restores, every newer step that failed
    is moved aside (``move_aside``: renamed into ``<workdir>/checkpoints_broken/``, never deleted), so the
    run can save those steps again when it redoes them. Nothing is moved when no step restores: then the
    cause is more likely the config (different shapes) than the files. Returns ``(None, None)`` when there
    is no checkpoint."""
    steps = all_steps(manager)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory}; have {steps}")
        try:
            return step, restore_step(manager, step, targets, with_data=with_data)
        except Exception as err:  # noqa: BLE001 - named in one line; --debug shows the chain
            raise DamagedCheckpointError(manager.directory, step, steps, err) from err
    broken, first_error = [], None
    for s in reversed(steps):
        try:
            restored = restore_step(manager, s, targets, with_data=with_data)
        except Exception as err:  # noqa: BLE001 - any failure means the step is unusable
            log.warning("checkpoint step %d in %s could not be restored (%s: %s); trying the previous one",
                        s, manager.directory, type(err).__name__, (str(err).splitlines() or [""])[0][:300])
            broken.append(s)
            first_error = first_error or err
            continue
        if broken:
            move_aside(manager, broken, restored_step=s)
        return s, restored
    if steps:
        first = (str(first_error).splitlines() or [""])[0][:200]
        raise ValueError(f"none of the checkpoints {steps} in {manager.directory} could be restored (newest: "
                         f"{type(first_error).__name__}: {first}); nothing was moved. If the config changed, "
                         "restore with the one they were written with; else start a new workdir")
    return None, None


BROKEN_DIR = "checkpoints_broken"


class DamagedCheckpointError(ValueError):
    """A checkpoint step asked for by number cannot be read (files deleted or cut short)."""

    def __init__(self, directory, step: int, steps: list[int], err: BaseException):
        first = (str(err).splitlines() or [""])[0][:200]
        older = [s for s in steps if s < step]
        hint = f"; pass --step with an older one ({older})" if older else ""
        super().__init__(f"checkpoint step {step} in {directory} cannot be read, its files are damaged or "
                         f"incomplete ({type(err).__name__}: {first}){hint}")


def move_aside(manager: ocp.CheckpointManager, steps: list[int], *, restored_step: int) -> list[str]:
    """Rename the folders of the unrestorable ``steps`` into ``<workdir>/checkpoints_broken/<step>`` (a
    numbered suffix if that exists) and reload the manager's step list, so that the redone steps can be
    saved again. Process 0 renames; every process waits for it. Returns the new paths."""
    root = os.path.dirname(os.path.abspath(str(manager.directory)))
    aside = os.path.join(root, BROKEN_DIR)
    moved = []
    for s in sorted(steps):
        src = os.path.join(str(manager.directory), str(s))
        dst, k = os.path.join(aside, str(s)), 1
        while os.path.exists(dst):
            dst, k = os.path.join(aside, f"{s}.{k}"), k + 1
        moved.append(dst)
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            os.rename(src, dst)
        log.warning("checkpoint step %d could not be restored: moved it to %s (not deleted; the run resumes from "
                    "step %d and redoes the steps after it)", s, dst, restored_step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sgt_jax_move_broken_checkpoints")
    manager.reload()
    return moved


def read_json_item(workdir: str, step: int, name: str) -> dict:
    """Read a JSON item (``config`` or ``layout``) of a step without touching arrays."""
    manager = make_manager(workdir, keep=1_000_000, async_save=False, read_only=True)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
        return restored[name]
    except Exception as err:  # noqa: BLE001 - a deleted or cut item file: one line naming the step
        raise DamagedCheckpointError(manager.directory, step, all_steps(manager), err) from err
    finally:
        manager.close()


def load_for_inference(workdir: str, step: int | None = None, weights: str = "ema", *,
                       abstract_params: dict) -> dict:
    """All model parameters of a training checkpoint as a pure nested dict.

    ``abstract_params``: the model's pure-dict parameter tree as ShapeDtypeStructs carrying the wanted
    shardings (e.g. ``nnx.state(abstract_model, nnx.Param).to_pure_dict()`` with shardings attached).
    Trainable parameters come from the ``ema`` item (``weights="ema"``, cast to the target dtype) or the
    ``params`` item (``"raw"``); frozen ones from ``frozen``. Which is which comes from the checkpoint's
    layout metadata."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    manager = make_manager(workdir, keep=1_000_000, async_save=False, read_only=True)
    try:
        steps = all_steps(manager)
        if not steps:
            raise FileNotFoundError(f"no training checkpoints in {checkpoint_dir(workdir)}")
        step = steps[-1] if step is None else step
        layout = read_json_item(workdir, step, "layout")
        frozen = set(layout["frozen_groups"])
        missing = _missing_groups(abstract_params, layout)
        if missing:
            raise ValueError(f"checkpoint step {step} in {workdir} has no parameters for {missing} (e.g. a run "
                             f"with cached latents keeps no VAE): load those from the imported workdir")
        if weights == "ema" and not layout.get("ema", True):
            raise ValueError(f"checkpoint step {step} in {workdir} has no EMA; use weights='raw'")
        train_t, frozen_t = split_pure(abstract_params, frozen)
        source = "ema" if weights == "ema" else "params"
        if weights == "ema":
            ema_dtype = jnp.dtype(layout.get("ema_dtype", "float32"))
            train_t = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, ema_dtype, sharding=x.sharding), train_t)
        targets = {source: train_t, "frozen": frozen_t}
        _, restored = restore_latest_valid(manager, targets, with_data=False, step=step)
        train = restored[source]
        if weights == "ema":
            train = jax.tree.map(lambda v, t: v.astype(t.dtype), train, split_pure(abstract_params, frozen)[0])
        return _merge_pure(train, restored["frozen"])
    finally:
        manager.close()


def _missing_groups(abstract_params: dict, layout: dict) -> list[str]:
    if not layout.get("with_vae", True) and "vae" in abstract_params:
        return ["vae"]
    return []


def split_pure(tree: dict, frozen: set[str], path=()) -> tuple[dict, dict]:
    """Split a pure parameter dict into (trainable, frozen) by parameter group (sgt_jax/models/groups.py)."""
    train, fro = {}, {}
    for k, v in tree.items():
        p = path + (str(k),)
        if isinstance(v, dict):
            a, b = split_pure(v, frozen, p)
            if a:
                train[k] = a
            if b:
                fro[k] = b
        elif group_of(p) in frozen:
            fro[k] = v
        else:
            train[k] = v
    return train, fro


def _merge_pure(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_pure(out[k], v) if k in out and isinstance(v, dict) else v
    return out
