"""The training loop serial vs overlapped, side by side in one run: steps/s and the device's wait for the host.

    python bench/overlap_bench.py --steps 40 --workdir runs/overlap_bench --out bench/results/overlap.md

Runs the main command (``python -m sgt_jax.main --config configs/sgt_tiny.py``) twice, each in a fresh
process and workdir, alternating the order over ``--repeats`` rounds:

* serial: ``--config.train.overlap=False --config.train.prefetch=0`` (the batch is packed in the main
  thread before each step, and each step's metrics are read right after its dispatch);
* overlapped: the defaults (batches packed and put on the devices 2 ahead on a thread, metrics read
  one step later).

Each run's summary line gives ``steps_per_s`` (finished steps per second, the compiling first step
excluded) and ``device_wait_fraction`` (share of that wall time the devices sat idle between the end of
one step and the dispatch of the next: sgt_jax/train/overlap.py ``DeviceClock``). The last line is
``steps/s overlapped/serial: R`` (medians over the rounds).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"serial": ["--config.train.overlap=False", "--config.train.prefetch=0"], "overlapped": []}


def run_once(mode: str, args, round_: int) -> dict:
    workdir = os.path.join(args.workdir, f"{mode}_{round_}")
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "sgt_jax.main", "--config", args.config, f"--workdir={workdir}",
           f"--config.train.steps={args.steps}", f"--config.checkpoint.every={args.steps}",
           "--config.train.tensorboard=False", *MODES[mode], *args.flag]
    print("+", shlex.join(cmd), flush=True)
    # one persistent compilation cache for all runs: only the first compiles (compile time is not timed)
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(args.workdir, "jax_cache")))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    summary = next((ln for ln in proc.stdout.splitlines() if ln.startswith("summary: ")), None)
    if summary is None:
        raise SystemExit(f"{mode} run printed no summary line:\n{proc.stdout[-2000:]}")
    out = {}
    for key in ("steps_per_s", "device_wait_fraction", "mean_step_time_s"):
        m = re.search(rf"\b{key}=([0-9.eE+-]+)", summary)
        if m is None:
            raise SystemExit(f"{mode}: no {key} in {summary!r}")
        out[key] = float(m.group(1))
    print(f"  {mode}: {out['steps_per_s']:.3f} steps/s, device waits {out['device_wait_fraction']:.1%}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sgt_tiny.py")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (serial, overlapped), order alternating")
    p.add_argument("--workdir", default="runs/overlap_bench")
    p.add_argument("--flag", action="append", default=[], help="extra sgt_jax.main flag for both modes")
    p.add_argument("--out", default="", help="append the result table (markdown) here")
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args(argv)
    if args.steps < 4:
        p.error("--steps must be >= 4 (the first two steps are not timed)")
    results = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in (("serial", "overlapped") if r % 2 == 0 else ("overlapped", "serial")):
            results[mode].append(run_once(mode, args, r))
    med = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in results.items()}
    ratio = med["overlapped"]["steps_per_s"] / med["serial"]["steps_per_s"]
    lines = ["| mode | steps/s (median) | device wait fraction (median) | runs (steps/s) |", "|---|---|---|---|"]
    for m in MODES:
        runs = ", ".join(f"{x['steps_per_s']:.3f}" for x in results[m])
        lines.append(f"| {m} | {med[m]['steps_per_s']:.3f} | {med[m]['device_wait_fraction']:.1%} | {runs} |")
    text = "\n".join(lines)
    print(text)
    final = f"steps/s overlapped/serial: {ratio:.2f}"
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"```\n{shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}\n```\n\n{text}\n\n"
                    f"{final}\n")
    print(final)


if __name__ == "__main__":
    main()
