"""Train-state checkpoints on top of sgt_jax/checkpoint/store.py (the only Orbax module).

* ``save_state``: async save of params, frozen, opt, EMA, scalars (step, RNG, NaN counters), the
  data-iterator state, the resolved config and layout metadata.
* ``restore_state``: newest restorable step (corrupt/partial ones are skipped with a warning) into the
  CURRENT shardings, so a checkpoint restores onto any mesh. Layout facts (scan layers, dtypes, freeze
  groups) are compared with the current config first and a mismatch is an error naming the field.
* ``initial_state``: own checkpoint > ``config.checkpoint.init_from`` (an imported workdir with
  params/, a BAGEL PyTorch folder through sgt_jax/checkpoint/convert.py, or an OmniGen2 folder through
  sgt_jax/checkpoint/omnigen2_folder.py) > random init.
* ``store.load_for_inference`` (in sgt_jax/checkpoint/store.py) reads the EMA or raw weights back.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax.sharding import Mesh

from sgt_jax.checkpoint import convert, omnigen2_folder
from sgt_jax.checkpoint import store
from sgt_jax.train import state as state_lib
from sgt_jax.train.freeze import frozen_groups

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
# Layout facts that must agree between a checkpoint and the config restoring it.
_MUST_MATCH = ("scan_layers", "scan_axis", "param_dtype", "frozen_groups", "with_vae", "ema")


def layout_meta(config, mesh: Mesh) -> dict:
    return {
        "version": LAYOUT_VERSION,
        "scan_layers": bool(config.model.scan_layers),
        "scan_axis": 0,
        "param_dtype": str(config.model.param_dtype),
        "ema_dtype": str(config.train.ema_dtype),
        "ema": float(config.train.ema_decay) > 0,
        "frozen_groups": sorted(frozen_groups(config)),
        "with_vae": state_lib.latents_online(config),
        "mesh": {k: int(v) for k, v in dict(mesh.shape).items()},
        "process_count": jax.process_count(),
    }


def check_layout(saved: dict, current: dict, where: str) -> None:
    bad = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in _MUST_MATCH
           if k in saved and saved.get(k) != current.get(k)]
    if bad:
        raise ValueError(f"checkpoint {where} does not fit the current config ({'; '.join(bad)}). Restore with "
                         f"the config it was written with, or start a new workdir.")


def _tree_items(state: dict) -> dict:
    return {
        "params": state["params"], "frozen": state["frozen"], "opt": state["opt"], "ema": state.get("ema"),
        "scalars": {k: state[k] for k in state_lib.SCALARS},
    }


def save_state(manager, state: dict, *, data_state: Any, config, mesh: Mesh, force: bool = False) -> bool:
    step = int(jax.device_get(state["step"]))
    return store.save(manager, step, _tree_items(state), data_state=data_state, config=config.to_dict(),
                      layout=layout_meta(config, mesh), force=force)


def restore_state(manager, spec: state_lib.StateSpec, config, mesh: Mesh, step: int | None = None):
    """``(state, data)`` from the newest valid checkpoint, or ``(None, None)`` if there is none.
    ``data`` is ``{"process_count", "states"}`` (one iterator state per writing process)."""
    targets = _tree_items(spec.abstract)
    found, restored = store.restore_latest_valid(manager, targets, step=step)
    if found is None:
        return None, None
    check_layout(restored["layout"], layout_meta(config, mesh), f"step {found} in {manager.directory}")
    state = {k: restored[k] for k in ("params", "frozen", "opt")}
    if restored.get("ema") is not None:
        state["ema"] = restored["ema"]
    state.update(restored["scalars"])
    log.info("restored step %d from %s", found, manager.directory)
    return state, restored[store.DATA_ITEM]


def initial_state(config, spec: state_lib.StateSpec, mesh: Mesh) -> dict:
    """A state for a run with no own checkpoint: from ``config.checkpoint.init_from`` or random."""
    src = str(config.checkpoint.init_from)
    if not src:
        return state_lib.init_state(config, spec)
    target = state_lib.full_param_target(spec)
    if os.path.exists(os.path.join(src, store.PARAMS_META)):
        meta = store.read_params_meta(src)
        saved_scan = meta.get("layout", {}).get("scan_layers", meta.get("scan_layers"))
        if saved_scan is not None and bool(saved_scan) != bool(config.model.scan_layers):
            raise ValueError(f"init_from {src!r} was written with scan_layers={saved_scan}, the config has "
                             f"{config.model.scan_layers}")
        # A model without its VAE (cached latents) restores the subset it has.
        params = store.load_params(src, target, strict="vae" in target)
    elif omnigen2_folder.is_omnigen2_folder(src):
        from sgt_jax import parallel

        params, _, _, _ = omnigen2_folder.import_folder(src, config, mesh, parallel.logical_rules(config))
        params = {k: v for k, v in params.items() if k in target}
    elif os.path.exists(os.path.join(src, "llm_config.json")):
        params, _, _ = convert.import_folder(src, config, progress=jax.process_index() == 0)
        params = {k: v for k, v in params.items() if k in target}  # no VAE in a cached-latent model
    else:
        raise FileNotFoundError(f"config.checkpoint.init_from={src!r} is neither an imported workdir "
                                f"({store.PARAMS_META}) nor a BAGEL folder (llm_config.json) nor an OmniGen2 folder "
                                "(transformer/ + mllm/)")
    log.info("initialised parameters (and EMA) from %s", src)
    return state_lib.state_from_params(config, spec, params)
