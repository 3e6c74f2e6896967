"""Executed / model FLOPs of the real train step per remat policy, from the traced program only (no compile).

    python bench/remat_flops.py --topology v5p-16 --policy full --policy qkv_out \\
        --set model.attention_impl=pallas

Tracing the 7B step for abstract TPU devices takes seconds, a TPU compile minutes to an hour on a small
CPU machine: run this first to see which policies could reach a FLOP goal, then compile only those
(``--mode compile``, or ``--config.compile.search_remat`` with ``remat_candidates``) for their memory.
The counts are those of the compile report (sgt_jax/compile.py ``count_flops``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set(config, item: str) -> None:
    key, _, raw = item.partition("=")
    *path, leaf = key.split(".")
    node = config
    for p in path:
        node = node[p]
    old = node[leaf]
    node[leaf] = type(old)(raw) if not isinstance(old, bool) else raw.lower() in ("1", "true")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/bagel_sgt.py:7b")
    p.add_argument("--topology", default="v5p-16")
    p.add_argument("--policy", action="append", required=True, help="a model.remat_policy (repeatable)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override, e.g. "
                   "model.attention_impl=pallas (repeatable)")
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    from sgt_jax import compile as C
    from sgt_jax.configs_util import load_config
    from sgt_jax.parallel import mesh as mesh_lib

    for policy in args.policy:
        config = load_config(args.config)
        config.compile.topology = args.topology
        for item in args.set:
            _set(config, item)
        config.model.remat_policy = policy
        spec, num_slices = C._apply_compile_overrides(config)
        mesh = mesh_lib.make_mesh(config.mesh, C.topology_devices(spec, num_slices))
        jitted, fargs = C._build_train_step(config, mesh)
        r = C.count_flops(config, jitted, fargs)
        print(f"{args.topology} {policy:<20} model {r['analytic_flops'] / 1e15:.2f} PFLOP, traced "
              f"{r['traced_flops'] / 1e15:.2f}, executed {r['executed_flops'] / 1e15:.2f} -> executed/model "
              f"{r['executed_over_analytic']:.3f}", flush=True)


if __name__ == "__main__":
    main()
