"""Issue 6 §3: the training loop as 2 processes (jax.distributed on localhost, one CPU device each).

Checks: the same losses as one process with the same global batch; each process reads a disjoint
data shard (their rows together are exactly the one-process batch); the checkpoint written by the two
processes resumes both as 2 processes and as 1 process, continuing the one-process loss curve."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.sharding.fake_batches import make_batch, row_crc, small_config

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = dict(rtol=2e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(train_env):
    return train_env


def _train(workdir, steps, env, processes: int, data_log=None):
    cmd = [sys.executable, "-m", "tests.sharding.fake_batches", str(workdir), str(steps), "2", "2"]
    if processes == 1:
        e = dict(env, SGT_TEST_DATA_LOG=str(data_log)) if data_log else env
        r = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return
    port = _free_port()
    procs = []
    # No persistent compilation cache for multi-process runs: on jax 0.12 (CPU, gloo) a 2-process step
    # loaded from the cache hangs in its first cross-process collective (measured: the same resume took
    # 78 s without the cache and timed out after 420 s with it); jax 0.10.2 is unaffected.
    multi_env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    for i in range(processes):
        e = dict(multi_env, SGT_COORDINATOR_ADDRESS=f"localhost:{port}", SGT_NUM_PROCESSES=str(processes),
                 SGT_PROCESS_ID=str(i))
        if data_log:
            e["SGT_TEST_DATA_LOG"] = str(data_log)
        procs.append(subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:  # never leave a hung process group behind (a TimeoutExpired would otherwise orphan them)
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_two_processes_match_one(tmp_path, env):
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, 6, env, 1)
    _train(two, 4, env, 2, data_log=tmp_path / "rows")
    ref, got = _losses(one), _losses(two)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        for k in ("loss", "ce", "mse", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], err_msg=f"step {a['step']} {k}", **TOL)
        assert b["n_ce"] == a["n_ce"] and b["n_mse"] == a["n_mse"]

    # disjoint shards whose union is the one-process global batch
    cfg = small_config(packs=2, latents="cached")
    rows = {}
    for pi in (0, 1):
        with open(f"{tmp_path / 'rows'}.p{pi}") as f:
            rows[pi] = [json.loads(line) for line in f]
    for (k0, *r0), (k1, *r1) in zip(rows[0], rows[1]):
        assert k0 == k1 and not set(r0) & set(r1)
        full = make_batch(cfg, seed=k0)
        assert r0 + r1 == [row_crc(full, i) for i in range(2)]

    # one checkpoint (written by both processes) resumes in either layout
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]
    data_files = sorted(f for f in os.listdir(two / "checkpoints" / "4" / "data") if f.endswith(".json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    again = tmp_path / "again"
    shutil.copytree(two, again)
    _train(two, 6, env, 1)  # resume as 1 process
    _check_continues(two, ref)
    _train(again, 6, env, 2)  # resume as 2 processes
    _check_continues(again, ref)


def _check_continues(run, ref):
    """The resumed run's steps 5-6 continue the one-process loss curve."""
    got = _losses(run)
    assert [m["step"] for m in got] == list(range(1, 7))
    for a, b in zip(ref[4:], got[4:]):
        for k in ("loss", "ce", "mse"):
            np.testing.assert_allclose(b[k], a[k], err_msg=f"{run.name} step {a['step']} {k}", **TOL)
