"""The training loop as a subprocess: kill -9 mid-run + resume == uninterrupted (losses bitwise on CPU,
same data order); corrupt latest checkpoint -> previous one with a warning, the broken step moved aside and
redone; NaN abort.

All runs use the same small config and shapes, so after the first compile the others load the
executable from a persistent compilation cache shared by this module."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sgt_jax.checkpoint import store
from tests.run_helpers import read_metrics

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def env(train_env):
    return train_env


def _cmd(workdir, steps, every, *extra):
    return [sys.executable, "-m", "tests.sharding.fake_batches", str(workdir), str(steps), str(every), "2",
            *map(str, extra)]


_metrics = read_metrics


STEPS = 7


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted run of STEPS steps (checkpoints at 2, 4, 6, 7): its workdir and metrics."""
    ref = tmp_path_factory.mktemp("ref")
    r = subprocess.run(_cmd(ref, STEPS, 2), env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "summary:" in r.stdout and "compiled memory per device" in r.stdout
    expected = _metrics(ref)
    assert [m["step"] for m in expected] == list(range(1, STEPS + 1))
    return ref, expected


def _same_losses(expected, got):
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(expected, got):
        assert (a["loss"], a["ce"], a["mse"], a["grad_norm"], a["batch_crc"]) == \
               (b["loss"], b["ce"], b["mse"], b["grad_norm"], b["batch_crc"]), (a, b)


def test_kill9_and_resume_matches_uninterrupted(tmp_path, env, reference):
    steps = STEPS
    _, expected = reference

    run = tmp_path / "killed"
    p = subprocess.Popen(_cmd(run, steps, 2, 0.7), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    try:
        while time.time() < deadline:  # wait until step 4 is done (a checkpoint at 2, maybe at 4)
            if os.path.exists(run / "metrics.jsonl") and len(_metrics(run)) >= 4:
                break
            if p.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.1)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert len(_metrics(run)) < steps
    r = subprocess.run(_cmd(run, steps, 2), env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_losses(expected, _metrics(run))


def test_damaged_latest_checkpoint_is_moved_aside_and_redone(tmp_path, env, reference):
    """Files of the latest step partly deleted: the rerun restores the previous step, moves the broken one
    into checkpoints_broken/ (kept, not deleted), redoes the steps, saves them again and ends like the
    undisturbed run (before the fix it died with StepAlreadyExistsError on every retry)."""
    ref, expected = reference
    run = tmp_path / "damaged"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / str(STEPS) / "opt" / "ocdbt.process_0" / "d")
    r = subprocess.run(_cmd(run, STEPS, 2), env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step {STEPS} could not be restored: moved it to {run / 'checkpoints_broken' / str(STEPS)}" in r.stderr
    assert "StepAlreadyExistsError" not in r.stderr
    assert (run / "checkpoints_broken" / str(STEPS) / "opt").is_dir()  # what might be recovered is kept
    assert store.all_steps(store.make_manager(str(run), keep=3, read_only=True))[-1] == STEPS
    _same_losses(expected, _metrics(run))


def test_sigterm_saves_and_exits_cleanly(tmp_path, env):
    run = tmp_path / "term"
    p = subprocess.Popen(_cmd(run, 50, 100, 0.5), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 900
    while time.time() < deadline and not (os.path.exists(run / "metrics.jsonl") and len(_metrics(run)) >= 2):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and "stopped by signal" in out
    done = _metrics(run)[-1]["step"]
    assert store.all_steps(store.make_manager(str(run), keep=3, read_only=True)) == [done]


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    manager = store.make_manager(str(tmp_path), keep=3, async_save=False)
    tree = lambda v: {"w": np.full((4, 3), v, np.float32), "b": {"x": np.arange(3, dtype=np.int32) + int(v)}}  # noqa
    for step in (1, 2):
        store.save(manager, step, {"params": tree(step)}, data_state={"k": step}, config={}, layout={})
    store.wait(manager)
    manager.close()
    # damage step 2: truncate every array data file of its params item
    damaged = 0
    for dirpath, _, files in os.walk(tmp_path / "checkpoints" / "2" / "params"):
        for name in files:
            if "ocdbt" in dirpath or name.startswith("manifest"):
                with open(os.path.join(dirpath, name), "r+b") as f:
                    f.truncate(7)
                damaged += 1
    assert damaged
    sds = jax.ShapeDtypeStruct
    target = {"params": jax.tree.map(lambda a: sds(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0])), tree(0))}
    manager = store.make_manager(str(tmp_path), keep=3)
    with caplog.at_level("WARNING"):
        step, restored = store.restore_latest_valid(manager, target)
    manager.close()
    assert step == 1
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), tree(1)["w"])
    assert restored["data"] == {"process_count": 1, "states": [{"k": 1}]}
    assert any("step 2" in r.message and "previous" in r.message for r in caplog.records)
    assert (tmp_path / "checkpoints_broken" / "2" / "params").is_dir() and not (tmp_path / "checkpoints" / "2").exists()


def test_nan_losses_abort_after_k_in_a_row(tmp_path, env):
    r = subprocess.run(_cmd(tmp_path / "nan", 20, 100, 0, 1, 3), env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode != 0
    assert "3 consecutive steps had a NaN/Inf loss or gradient" in r.stderr
    m = _metrics(tmp_path / "nan")
    assert [x["applied"] for x in m] == [True, False, False, False]
    assert [x["skipped"] for x in m] == [0, 1, 2, 3]
