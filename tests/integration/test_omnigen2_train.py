"""OmniGen2 SGT training end to end on the tiny config (real data pipeline, loop, checkpoints): kill -9
mid-run + resume == uninterrupted (losses, gradient norms and data order bitwise on CPU), and the realised
seg:VQA ratio in metrics.jsonl is 2. Runs share one persistent compilation cache (tests/integration/conftest.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.run_helpers import read_metrics

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4


def _cmd(workdir, steps, every, delay=0.0):
    return [sys.executable, "-m", "tests.integration.og2_runner", str(workdir), str(steps), str(every), str(delay)]


_metrics = read_metrics


def test_kill9_and_resume_matches_uninterrupted(tmp_path, train_env):
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(ref, STEPS, 2), env=train_env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "summary:" in r.stdout and "seg_vqa_ratio=2.0" in r.stdout
    expected = _metrics(ref)
    assert [m["step"] for m in expected] == list(range(1, STEPS + 1))
    assert all(m["seg_vqa_ratio"] == 2.0 and (m["n_seg"], m["n_vqa"]) == (2, 1) for m in expected)
    assert all(m["ce"] > 0 and m["mse"] > 0 and m["applied"] for m in expected)

    run = tmp_path / "killed"
    p = subprocess.Popen(_cmd(run, STEPS, 2, 1.0), env=train_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    try:
        while time.time() < deadline and len(_metrics(run)) < 2:  # step 2 logged: its checkpoint is written
            if p.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert 2 <= len(_metrics(run)) < STEPS
    r = subprocess.run(_cmd(run, STEPS, 2), env=train_env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _metrics(run)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(expected, got):
        assert (a["loss"], a["ce"], a["mse"], a["grad_norm"], a["batch_crc"]) == \
               (b["loss"], b["ce"], b["mse"], b["grad_norm"], b["batch_crc"]), (a, b)
