#!/usr/bin/env python3
"""Install sgt_jax on every worker of every slice (a venv with sgt_jax[tpu], i.e. jax + libtpu).

The code travels as a tarball of this checkout's HEAD (``git archive``; uncommitted edits are NOT
included - commit first) or is cloned from ``--git``. Each worker then gets ~/sgt_jax and ~/sgt_venv.

Examples:
  python tpu/install.py --name sgt --zone us-east5-a
  python tpu/install.py --name sgt --zone us-east5-a --num-slices 2 --git https://github.com/<you>/sgt_jax
  python tpu/install.py --name sgt --zone us-east5-a --dry-run
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_common as tc  # noqa: E402

TARBALL = "sgt_jax.tar.gz"


def remote_install(args) -> str:
    """The shell command each worker runs."""
    steps = [f"mkdir -p {tc.REMOTE_LOGS}"]
    if args.git:
        steps.append(f"(test -d {tc.REMOTE_REPO}/.git || git clone {args.git} {tc.REMOTE_REPO})")
        steps.append(f"git -C {tc.REMOTE_REPO} pull --ff-only")
    else:
        steps.append(f"rm -rf {tc.REMOTE_REPO} && mkdir -p {tc.REMOTE_REPO} && "
                     f"tar -xzf $HOME/{TARBALL} -C {tc.REMOTE_REPO}")
    steps += [
        f"(test -x {tc.REMOTE_VENV}/bin/python || python3 -m venv {tc.REMOTE_VENV})",
        f"{tc.REMOTE_VENV}/bin/pip install -q -U pip",
        f'{tc.REMOTE_VENV}/bin/pip install -q -e "{tc.REMOTE_REPO}[tpu]"',
        f"{tc.REMOTE_VENV}/bin/python -c 'import sgt_jax, jax; print(jax.__version__, jax.local_device_count())'",
    ]
    return " && ".join(steps)


def commands(args) -> list[list[str]]:
    cmds = []
    if not args.git:
        local = os.path.join(args.tmpdir, TARBALL)
        cmds.append(["git", "-C", tc.REPO_ROOT, "archive", "--format=tar.gz", "-o", local, "HEAD"])
        for node in tc.nodes(args):
            cmds.append(tc.scp(node, args, local, f"{node}:~/{TARBALL}"))
    for node in tc.nodes(args):
        cmds.append(tc.ssh(node, args, remote_install(args)))
    return cmds


def main(argv=None):
    p = tc.parser(__doc__)
    p.add_argument("--git", default="", help="clone this repository URL on the workers instead of copying HEAD")
    p.add_argument("--tmpdir", default="/tmp", help="local folder for the code tarball")
    args = p.parse_args(argv)
    tc.check(args)
    tc.run_all(args, commands(args))


if __name__ == "__main__":
    main()
