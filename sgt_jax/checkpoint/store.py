"""The only module that imports Orbax.

Two kinds of checkpoint live in a workdir (docs/interfaces.md §4):
  <workdir>/params/            model parameters (imported weights), an Orbax PyTree, + params_meta.json
  <workdir>/checkpoints/<step> training checkpoints (CheckpointManager; see the manager functions below)

Restores always take an abstract target (ShapeDtypeStructs carrying the *current* shardings), so a
checkpoint written on one mesh restores onto any other, and no process materialises the full model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PARAMS_DIR = "params"
PARAMS_META = "params_meta.json"


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


def load_params(workdir: str, abstract_params: Any) -> Any:
    """Restore <workdir>/params into the shardings carried by ``abstract_params`` (ShapeDtypeStructs)."""
    path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no imported parameters in {workdir!r}: {path} does not exist")
    return ocp.StandardCheckpointer().restore(path, abstract_params)
