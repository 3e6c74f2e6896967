"""Multi-process start-up and the checks that must fail loudly before any compile.

Why here: ``jax.distributed.initialize`` must run before anything touches a JAX backend, and only when
the job really is several processes. The launch information comes from (first wins):
  * ``config.mesh.distributed.*`` (coordinator_address, num_processes, process_id), or
  * environment variables ``SGT_COORDINATOR_ADDRESS``, ``SGT_NUM_PROCESSES``, ``SGT_PROCESS_ID``
    (what tests/integration/test_multiprocess.py and tpu/ launch scripts set), or
  * ``config.mesh.distributed.auto = True``: let JAX detect the cluster (TPU VM pods, SLURM, ...).
With none of these, a single process runs and nothing is initialised.

``check_platform`` guards against the silent CPU fallback seen on TPU VMs and Colab when another
process holds the chips (a silent fallback that JAX allows).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "SGT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SGT_NUM_PROCESSES"
ENV_PROCESS_ID = "SGT_PROCESS_ID"

_initialized = False


def distributed_settings(config) -> dict | None:
    """The resolved ``jax.distributed.initialize`` arguments, or None for a single-process run."""
    dist = config.mesh.distributed
    coordinator = dist.coordinator_address or os.environ.get(ENV_COORDINATOR, "")
    num = dist.num_processes or int(os.environ.get(ENV_NUM_PROCESSES, "0") or 0)
    pid = dist.process_id if dist.process_id >= 0 else int(os.environ.get(ENV_PROCESS_ID, "-1") or -1)
    auto = bool(dist.auto)
    if coordinator or num > 1:
        if not coordinator or num < 1 or pid < 0:
            raise ValueError(
                "multi-process launch needs all three of coordinator_address, num_processes and process_id "
                f"(config.mesh.distributed.* or ${ENV_COORDINATOR}/${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID}); "
                f"got coordinator={coordinator!r}, num_processes={num}, process_id={pid}")
        if num == 1:
            return None
        if pid >= num:
            raise ValueError(f"process_id {pid} is out of range for num_processes {num}")
        return dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
    if auto:
        return {}
    return None


def maybe_initialize(config) -> bool:
    """Call ``jax.distributed.initialize`` when the config/environment describe several processes.

    Returns True if it initialised (or had already). Must run before any backend use."""
    global _initialized
    if _initialized:
        return True
    settings = distributed_settings(config)
    if settings is None:
        return False
    log.info("jax.distributed.initialize(%s)", settings or "auto-detect")
    jax.distributed.initialize(**settings)
    _initialized = True
    return True


def check_platform(config) -> str:
    """Fail if the default backend is not ``config.train.platform`` ("" or "any": accept whatever)."""
    wanted = str(config.train.platform).lower()
    actual = jax.default_backend().lower()
    if wanted in ("", "any"):
        return actual
    aliases = {"gpu": ("gpu", "cuda", "rocm"), "cuda": ("gpu", "cuda"), "tpu": ("tpu",), "cpu": ("cpu",)}
    if wanted not in aliases:
        raise ValueError(f"config.train.platform={wanted!r}; allowed: '', 'any', 'cpu', 'gpu', 'tpu'")
    if actual not in aliases[wanted]:
        raise RuntimeError(
            f"config.train.platform is {wanted!r} but JAX is running on {actual!r} "
            f"({jax.device_count()} devices: {jax.devices()[:2]}...). On a TPU VM this usually means another "
            f"process holds the chips or libtpu failed to load; fix that, or set --config.train.platform=any.")
    return actual
