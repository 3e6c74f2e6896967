"""Shared setup of the integration tests that run the training loop as subprocesses."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def train_env(tmp_path_factory):
    """Environment for ``python -m tests.sharding.fake_batches`` subprocesses: CPU only, this checkout on
    the path, gloo CPU collectives (multi-process runs), no launcher variables inherited, and one
    persistent compilation cache for the whole session so only the first run of a shape compiles."""
    cache = tmp_path_factory.getbasetemp() / "sgt_train_jax_cache"
    cache.mkdir(exist_ok=True)
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    e.pop("XLA_FLAGS", None)
    for k in ("SGT_COORDINATOR_ADDRESS", "SGT_NUM_PROCESSES", "SGT_PROCESS_ID"):
        e.pop(k, None)
    return e
