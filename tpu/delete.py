#!/usr/bin/env python3
"""Delete what tpu/create.py made: a TPU VM, or a queued resource together with its nodes.

Examples:
  python tpu/delete.py --name sgt --zone us-east5-a              # TPU VM
  python tpu/delete.py --name sgt --zone us-east5-a --queued     # queued resource (+ its slices)
  python tpu/delete.py --name sgt --zone us-east5-a --num-slices 2   # multislice = queued
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_common as tc  # noqa: E402


def commands(args) -> list[list[str]]:
    loc = tc.location_flags(args)
    quiet = ["--quiet"] if args.yes else []
    if args.queued or args.num_slices > 1:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *loc, "--force", *quiet]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *loc, *quiet]]


def main(argv=None):
    p = tc.parser(__doc__)
    p.add_argument("--queued", action="store_true", help="the TPU was created as a queued resource")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (gcloud --quiet)")
    args = p.parse_args(argv)
    tc.check(args)
    tc.run_all(args, commands(args))


if __name__ == "__main__":
    main()
