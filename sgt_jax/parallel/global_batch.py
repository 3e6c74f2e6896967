"""Host batches (numpy, per process) -> global jax.Arrays on the batch sharding.

Why ``jax.make_array_from_process_local_data``: each process feeds only its own rows, and the function
places them on the process's devices according to the *real* batch NamedSharding (batch over the
``batch`` rule's mesh axes, replicated over the others), so the same code runs on 1 CPU, 8 fake CPU
devices, several processes, or a pod (``jax.make_array_from_process_local_data``, as MaxText does).

Only the model-facing keys of docs/interfaces.md §1 go to the device; bookkeeping keys (n_seg, n_vqa,
useful_tokens, ...) stay on the host for metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sgt_jax.parallel.mesh import Rules, batch_sharding, batch_shards

# docs/interfaces.md §1 (BAGEL packs) and sgt_jax/data/omnigen2_plan.py (OmniGen2 rows): every key the jitted
# step may read.
DEVICE_KEYS = (
    "tokens", "kind", "doc", "split", "mode", "order", "rope", "vit_row",
    "vit_patches", "vit_pos", "vit_image",
    "latent_pos", "latent_image", "latent_target", "latent_mean", "latent_logvar", "vae_images", "latent_rc",
    "ce_pos", "ce_label", "ce_valid",
    # OmniGen2 rows (sgt_jax/data/omnigen2_plan.py)
    "mrope", "vision_index", "vit_window", "vit_hw", "target_images", "target_hw",
)


def device_part(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The model-facing part of a host batch (keys of DEVICE_KEYS that are present)."""
    return {k: batch[k] for k in DEVICE_KEYS if k in batch}


def global_batch_shapes(local_batch: Mapping[str, Any], process_count: int | None = None) -> dict:
    """Global ShapeDtypeStructs (no sharding) for a host batch: dim 0 times the process count."""
    n = jax.process_count() if process_count is None else process_count
    return {k: jax.ShapeDtypeStruct((v.shape[0] * n,) + tuple(v.shape[1:]), v.dtype)
            for k, v in device_part(local_batch).items()}


def batch_shardings(mesh: Mesh, rules: Rules, keys) -> dict[str, NamedSharding]:
    sharding = batch_sharding(mesh, rules)
    return {k: sharding for k in keys}


def to_global(local_batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's rows (every process calls this with its own rows)."""
    local = device_part(local_batch)
    if not local:
        raise ValueError(f"host batch has none of the model keys {DEVICE_KEYS}; got {sorted(local_batch)}")
    sizes = {k: np.shape(v)[0] for k, v in local.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"host batch arrays disagree on the batch dimension: {sizes}")
    local_b = next(iter(sizes.values()))
    global_b = local_b * jax.process_count()
    shards = batch_shards(mesh, rules)
    if global_b % shards:
        raise ValueError(
            f"global batch {global_b} (= {local_b} per process x {jax.process_count()} processes) is not "
            f"divisible by the {shards} batch shards of mesh {dict(mesh.shape)}; change the per-process "
            f"batch size or config.mesh.shape")
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_b,) + np.shape(v)[1:])
            for k, v in local.items()}
