#!/usr/bin/env python3
"""Create a TPU VM slice, or a queued resource (one or several slices), for sgt_jax.

Examples:
  # one v5p-16 slice (2 hosts x 4 chips), as a queued resource (recommended: waits for capacity)
  python tpu/create.py --name sgt --zone us-east5-a --type v5p-16 --queued
  # immediate TPU VM create (fails if there is no capacity)
  python tpu/create.py --name sgt --zone us-east5-a --type v5p-8
  # multislice: 2 x v5p-16 over the data-center network (always a queued resource)
  python tpu/create.py --name sgt --zone us-east5-a --type v5p-16 --num-slices 2
  # print what would run
  python tpu/create.py --name sgt --zone us-east5-a --type v6e-64 --queued --spot --dry-run
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_common as tc  # noqa: E402


def commands(args) -> list[list[str]]:
    fam = tc.family(args.type)
    version = args.runtime_version or tc.RUNTIME_VERSIONS[fam]
    loc = tc.location_flags(args)
    extra = (["--spot"] if args.spot else []) + (["--reserved"] if args.reserved else [])
    if args.num_slices == 1 and not args.queued:
        return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *loc,
                 f"--accelerator-type={args.type}", f"--version={version}", *extra]]
    if args.num_slices == 1:
        target = [f"--node-id={args.name}"]
    else:
        target = [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"]
    create = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *loc,
              f"--accelerator-type={args.type}", f"--runtime-version={version}", *target, *extra]
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *loc,
                "--format=value(state.state)"]
    return [create, describe]


def main(argv=None):
    p = tc.parser(__doc__)
    p.add_argument("--type", required=True, help="accelerator type: v4-N, v5litepod-N, v5p-N, v6e-N")
    p.add_argument("--runtime-version", default="", help="TPU software version (default per family: "
                   + ", ".join(f"{k}={v}" for k, v in tc.RUNTIME_VERSIONS.items()) + ")")
    p.add_argument("--queued", action="store_true", help="create a queued resource (implied by --num-slices>1)")
    p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible; resume from checkpoints)")
    p.add_argument("--reserved", action="store_true", help="use a reservation")
    args = p.parse_args(argv)
    tc.check(args)
    cmds = commands(args)
    tc.run_all(args, cmds)
    if len(cmds) > 1:
        print("# a queued resource is usable when its state is ACTIVE; re-run the describe command above "
              "until it is, then: python tpu/install.py ...", flush=True)


if __name__ == "__main__":
    main()
