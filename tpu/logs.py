#!/usr/bin/env python3
"""Follow or collect the logs of a run started by tpu/launch.py.

  --follow            stream ~/sgt_logs/<run>.log of one worker (default worker 0 of slice 0)
  --collect DIR       copy every worker's log to DIR/<node>/ (one scp per node, all workers)
  (neither)           print the last --lines lines of every worker's log

Examples:
  python tpu/logs.py --name sgt --zone us-east5-a --run sgt7b --follow
  python tpu/logs.py --name sgt --zone us-east5-a --run sgt7b --collect ./logs/sgt7b
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_common as tc  # noqa: E402


def commands(args) -> list[list[str]]:
    log = f"{tc.REMOTE_LOGS}/{args.run}.log"
    nodes = tc.nodes(args)
    if args.follow:
        node = nodes[args.slice]
        return [tc.ssh(node, args, f"tail -n {args.lines} -F {log}", worker=str(args.worker))]
    if args.collect:
        # every worker copies its log under a host-specific name, then one scp per node pulls them all
        cmds = []
        for node in nodes:
            dest = os.path.join(args.collect, node)
            cmds.append(tc.ssh(node, args, f'cp {log} "{tc.REMOTE_LOGS}/{args.run}-$(hostname).log"'))
            cmds.append(["mkdir", "-p", dest])
            cmds.append(tc.scp(node, args, f"{node}:~/sgt_logs/{args.run}-*.log", dest + "/"))
        return cmds
    return [tc.ssh(node, args, f"echo \"== $(hostname)\"; tail -n {args.lines} {log}") for node in nodes]


def main(argv=None):
    p = tc.parser(__doc__)
    p.add_argument("--run", default="sgt", help="run name given to tpu/launch.py")
    p.add_argument("--follow", action="store_true", help="stream one worker's log")
    p.add_argument("--worker", type=int, default=0, help="--follow: worker index inside the slice")
    p.add_argument("--slice", type=int, default=0, help="--follow: slice index (multislice)")
    p.add_argument("--collect", default="", metavar="DIR", help="copy all workers' logs into DIR")
    p.add_argument("--lines", type=int, default=50, help="lines to show")
    args = p.parse_args(argv)
    tc.check(args)
    if not 0 <= args.slice < args.num_slices:
        p.error(f"--slice {args.slice} out of range for --num-slices {args.num_slices}")
    tc.run_all(args, commands(args))


if __name__ == "__main__":
    main()
