#!/usr/bin/env python3
"""Launch ``python -m sgt_jax.main`` on every worker of every slice (one process per host).

All workers run the same command. With more than one host, ``--config.mesh.distributed.auto=True`` is
added so that ``jax.distributed.initialize()`` discovers the pod from the TPU VM metadata (coordinator,
process count and id); multislice jobs also get the mesh's ``data`` axis over the slices
(``--config.mesh.shape=(S,-1,1)``: FSDP inside a slice over ICI, data parallel across slices over DCN).
The process runs under nohup; its log is ``~/sgt_logs/<run>.log`` and its pid ``~/sgt_logs/<run>.pid`` on
each worker (see tpu/logs.py to follow or collect them, ``--stop`` to end the run).

Examples:
  python tpu/launch.py --name sgt --zone us-east5-a --type v5p-16 --run sgt7b \\
      --config configs/bagel_sgt.py:7b --workdir gs://my-bucket/sgt7b \\
      -- --config.checkpoint.init_from=gs://my-bucket/bagel7b_imported
  python tpu/launch.py --name sgt --zone us-east5-a --type v5p-16 --run sgt7b --stop
"""

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_common as tc  # noqa: E402

# Hosts per slice from the accelerator type (4 chips per host on multi-host slices; cores/2 on v4/v5p).
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1}


def hosts_per_slice(accelerator_type: str) -> int:
    fam = tc.family(accelerator_type)
    chips = int(accelerator_type.rsplit("-", 1)[1]) // CORES_PER_CHIP[fam]
    if fam in ("v5litepod", "v6e") and chips <= 8:
        return 1
    return max(1, chips // 4)


def remote_command(args) -> str:
    log, pid = f"{tc.REMOTE_LOGS}/{args.run}.log", f"{tc.REMOTE_LOGS}/{args.run}.pid"
    if args.stop:  # kill exactly the process we started (its pid file), nothing else
        return f"test -f {pid} && kill $(cat {pid}) && rm -f {pid} || echo 'no running {args.run}'"
    flags = [f"--config={args.config}", f"--workdir={args.workdir}", f"--mode={args.mode}"]
    if hosts_per_slice(args.type) * args.num_slices > 1:
        flags.append("--config.mesh.distributed.auto=True")
    if args.num_slices > 1:
        flags.append(f"--config.mesh.shape=({args.num_slices},-1,1)")
    flags += args.extra
    env = [f"export {shlex.quote(kv)}" for kv in args.env]
    main = " ".join([f"{tc.REMOTE_VENV}/bin/python", "-m", "sgt_jax.main", *map(shlex.quote, flags)])
    parts = [f"mkdir -p {tc.REMOTE_LOGS}", f"cd {tc.REMOTE_REPO}", *env]
    if args.foreground:
        parts.append(f"{main} 2>&1 | tee {log}")
    else:
        parts.append(f"(test -f {pid} && kill -0 $(cat {pid}) 2>/dev/null && "
                     f"echo 'run {args.run} is already running' && exit 1 || true)")
        parts.append(f"nohup {main} > {log} 2>&1 < /dev/null & echo $! > {pid}")
    return " && ".join(parts)


def commands(args) -> list[list[str]]:
    return [tc.ssh(node, args, remote_command(args)) for node in tc.nodes(args)]


def main(argv=None):
    p = tc.parser(__doc__)
    p.add_argument("--type", required=True, help="accelerator type of one slice, e.g. v5p-16")
    p.add_argument("--run", default="sgt", help="run name: names the log and pid files on the workers")
    p.add_argument("--config", default="configs/bagel_sgt.py:7b", help="config FILE[:VARIANT] (repo-relative)")
    p.add_argument("--workdir", default="", help="run directory, ideally gs://bucket/run (shared by all hosts)")
    p.add_argument("--mode", default="train", help="sgt_jax.main --mode (train, import, export, prepare, ...)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the run (repeatable), e.g. LIBTPU_INIT_ARGS=...")
    p.add_argument("--foreground", action="store_true", help="stream output instead of nohup (Ctrl-C stops ssh)")
    p.add_argument("--stop", action="store_true", help="kill the run's process (from its pid file) on all workers")
    p.add_argument("extra", nargs="*", help="extra sgt_jax.main flags after '--', e.g. --config.train.steps=100")
    args = p.parse_args(argv)
    tc.check(args)
    tc.family(args.type)
    if not args.stop and not args.workdir:
        p.error("--workdir is required (use a gs:// path so that every host sees the same checkpoints)")
    if "--dry-run" in args.extra:
        p.error("--dry-run after '--' would be passed to sgt_jax.main: put it before '--'")
    for kv in args.env:
        if "=" not in kv:
            p.error(f"--env {kv!r}: expected KEY=VALUE")
    tc.run_all(args, commands(args))


if __name__ == "__main__":
    main()
