"""Manual check: ``--mode prepare`` as 2 ``jax.distributed`` processes on CPU (localhost, the SGT_* environment of
sgt_jax/parallel/distributed.py) writes the same shards and report counts as one process. Each process prepares
its own blocks, process 0 merges after a barrier. ~2 min on a loaded 2-core machine (three JAX start-ups),
so the suite tests the same merge through ``config.prepare.shard=i/n`` instead
(tests/unit/test_prepare.py::test_two_shards_then_merge_equal_one_process).

    PYTHONPATH=. .venv/bin/python bench/prepare_distributed_check.py [--samples 5] [--per-shard 2]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outputs(folder: str):
    files = {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
             if ".part-" not in f and f != "prepare_report.json"}
    with open(os.path.join(folder, "prepare_report.json")) as f:
        rep = json.load(f)
    for fam in rep["families"].values():
        fam.pop("seconds")
    for k in ("workdir", "shards"):
        rep.pop(k)
    return files, rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--per-shard", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="prepare_check_")
    cmd = [sys.executable, "-m", "sgt_jax.main", "--mode", "prepare", "--config", "configs/sgt_tiny.py",
           f"--config.data.sources.synthetic.num_samples={args.samples}",
           f"--config.data.sources.records_per_shard={args.per_shard}", "--config.data.latents=online"]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    t0 = time.time()
    subprocess.run(cmd + ["--workdir", os.path.join(tmp, "one")], cwd=ROOT, env=env, check=True, timeout=600)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(cmd + ["--workdir", os.path.join(tmp, "two")], cwd=ROOT,
                              env=dict(env, SGT_COORDINATOR_ADDRESS=f"localhost:{port}", SGT_NUM_PROCESSES="2",
                                       SGT_PROCESS_ID=str(i))) for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], codes
    assert os.path.exists(os.path.join(tmp, "two", "prepare_report.part-00001-of-00002.json"))
    one, two = _outputs(os.path.join(tmp, "one")), _outputs(os.path.join(tmp, "two"))
    assert one == two, "2-process prepare differs from 1 process"
    print(f"2 jax.distributed processes: {len(one[0])} files and the report equal to 1 process "
          f"in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
