"""Shared pieces of the tpu/ scripts: flags, node naming, gcloud command builders, a dry-run runner.

Every script builds plain ``gcloud`` argument lists and hands them to :class:`Runner`, which prints each
command (shell-quoted, copy-pasteable) and runs it unless ``--dry-run``. Nothing here needs Python
packages beyond the standard library, so the scripts run from any laptop with the gcloud CLI.

Naming: one slice is a TPU VM called ``--name``. A multislice job (``--num-slices N > 1``) is one queued
resource called ``--name`` whose N slices are the nodes ``<name>-0 … <name>-(N-1)``
(``--node-prefix <name>``); every per-node command is repeated for each node.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

# Default TPU VM software versions per family (Cloud TPU docs, "TPU software versions").
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ACCELERATOR_RE = re.compile(r"(v4|v5litepod|v5p|v6e)-(\d+)")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paths on the workers, as the remote shell sees them ($HOME expands inside double quotes, ~ does not).
REMOTE_REPO = "$HOME/sgt_jax"
REMOTE_VENV = "$HOME/sgt_venv"
REMOTE_LOGS = "$HOME/sgt_logs"


def family(accelerator_type: str) -> str:
    m = ACCELERATOR_RE.fullmatch(accelerator_type)
    if not m:
        raise SystemExit(f"error: --type {accelerator_type!r}: expected v4-N, v5litepod-N, v5p-N or v6e-N "
                         "(e.g. v5p-16)")
    return m.group(1)


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the flags every script shares."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM name (single slice) or queued-resource name")
    p.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-central2-b (v4), us-east1-d (v6e)")
    p.add_argument("--project", default="", help="GCP project (default: gcloud's configured project)")
    p.add_argument("--num-slices", type=int, default=1,
                   help="multislice: number of slices (nodes <name>-0..N-1 of one queued resource)")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    return p


def check(args) -> None:
    if args.num_slices < 1:
        raise SystemExit(f"error: --num-slices must be >= 1, got {args.num_slices}")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.name):
        raise SystemExit(f"error: --name {args.name!r}: lowercase letters, digits and '-', starting with a letter")


def location_flags(args) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def nodes(args) -> list[str]:
    """The TPU VM (node) names the job runs on."""
    if args.num_slices == 1:
        return [args.name]
    return [f"{args.name}-{i}" for i in range(args.num_slices)]


def ssh(node: str, args, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *location_flags(args), f"--worker={worker}",
            f"--command={command}"]


def scp(node: str, args, src: str, dst: str, worker: str = "all", recurse: bool = False) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *(["--recurse"] if recurse else []), src, dst,
            *location_flags(args), f"--worker={worker}"]


class Runner:
    """Prints each command; runs it unless dry-run. Stops at the first failure with its exit code."""

    def __init__(self, dry_run: bool, out=sys.stdout):
        self.dry_run = dry_run
        self.out = out

    def __call__(self, cmd: list[str], check: bool = True) -> int:
        print(("[dry-run] " if self.dry_run else "+ ") + shlex.join(cmd), file=self.out, flush=True)
        if self.dry_run:
            return 0
        rc = subprocess.call(cmd)
        if rc and check:
            raise SystemExit(f"command failed with exit code {rc}: {shlex.join(cmd)}")
        return rc


def run_all(args, cmds: list[list[str]]) -> None:
    """Print and (unless ``--dry-run``) run ``cmds`` in order, stopping at the first failure."""
    run = Runner(args.dry_run)
    for cmd in cmds:
        run(cmd)
