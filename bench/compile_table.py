"""Run ``--mode compile`` for several TPU topologies (one process at a time) and write a markdown table.

    python bench/compile_table.py --out bench/results/compile.md --workdir runs/compile_table \\
        --case v5p-16 --case v5p-8:--config.train.ema_dtype=bfloat16 ...

Each ``--case`` is ``TOPOLOGY[:FLAG[,FLAG...]]``: extra ``sgt_jax.main`` flags for that row (e.g. smaller
packs or a bf16 EMA). Every row runs ``python -m sgt_jax.main --mode compile --config CONFIG
--config.compile.topology=TOPOLOGY --workdir WORKDIR/<row> FLAGS`` in a fresh process (a 7B compile
takes minutes and GBs of host RAM; rows never run concurrently), then reads the JSON report it wrote.
Rows whose report exists already are not recompiled unless ``--force`` (so an interrupted table resumes).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gib(x) -> str:
    return f"{x / 2**30:.1f}"


def row_name(case: str) -> str:
    """The row's workdir name: the case in file-name characters; a long case is cut and ends with a hash of
    the whole case, so two cases that differ only after the cut never share a workdir (and a cached report)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", case)
    if len(name) <= 120:
        return name
    return name[:100] + "_" + hashlib.sha1(case.encode()).hexdigest()[:12]


def run_case(case: str, args) -> dict:
    topology, _, extra = case.partition(":")
    flags = [f for f in extra.split(",") if f]
    workdir = os.path.join(args.workdir, row_name(case))
    found = glob.glob(os.path.join(workdir, "compile_*.json"))
    if found and not args.force:
        with open(found[0]) as f:
            return json.load(f)
    cmd = [sys.executable, "-m", "sgt_jax.main", "--mode", "compile", "--config", args.config,
           f"--config.compile.topology={topology}", f"--workdir={workdir}", *flags]
    print("+", shlex.join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "stdout.txt"), "w") as f:
        f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["?"]
        return {"topology": topology, "error": last[0][:300], "wall_s": time.time() - t0}
    found = glob.glob(os.path.join(workdir, "compile_*.json"))
    with open(found[0]) as f:
        rep = json.load(f)
    rep["wall_s"] = time.time() - t0
    return rep


def _tried(t: dict, chosen) -> str:
    if t["policy"] == chosen:
        return f"**{t['policy']}**"
    return f"{t['policy']} ({'OOM' if 'total_bytes' not in t else format(t['hbm_fraction'], '.0%')})"


def table(rows: list[tuple[str, dict]]) -> str:
    head = ("| case | chips (hosts) | tokens/chip | micro-batches | remat | args GiB | temp GiB | out-alias GiB | "
            "total GiB / HBM GiB | fits | analytic TFLOP/step | traced/analytic (every block) | "
            "executed/analytic (live blocks) | compile s |\n|" + "---|" * 14)
    lines = [head]
    for case, r in rows:
        if "error" in r:
            lines.append(f"| `{case}` | | | | | | | | | error: {r['error']} | | | | |")
            continue
        if "total_bytes" in r:
            mem = (f"{gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | "
                   f"{gib(r['output_bytes'] - r['alias_bytes'])} | {gib(r['total_bytes'])} / {gib(r['hbm_bytes'])}")
        else:  # the compiler ran out of HBM: no memory analysis, the message is in the JSON report
            need = re.search(r"temporaries \(([0-9.]+G)\)", r.get("oom_message", ""))
            mem = f"– | {need.group(1) if need else '–'} (compiler) | – | OOM / {gib(r['hbm_bytes'])}"
        executed = (f"{r['executed_over_analytic']:.2f} ({r['attention_live_fraction']:.0%} live)"
                    if "executed_over_analytic" in r else "–")
        remat = r.get("remat_policy", "")
        if "remat_search" in r:  # every policy tried, the chosen one in bold
            remat = " → ".join(_tried(t, r.get("chosen")) for t in r["remat_search"])
        fits = "**yes**" if r["fits"] and r.get("chosen", True) else ("yes, < headroom" if r["fits"] else "no")
        flops = f"{r['analytic_flops'] / 1e12:.0f} | {r['traced_over_analytic']:.2f}" if "analytic_flops" in r \
            else "– | –"
        lines.append(
            f"| `{case}` | {r['num_chips'] * r['num_slices']} ({r['hosts']}) | {r['tokens_per_chip']:.0f} | "
            f"{r.get('microbatches', 1)} | {remat} | {mem} | {fits} | {flops} | {executed} | "
            f"{r.get('compile_s', 0):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/bagel_sgt.py:7b")
    p.add_argument("--case", action="append", required=True, help="TOPOLOGY[:FLAG,FLAG...] (repeatable)")
    p.add_argument("--workdir", default="runs/compile_table")
    p.add_argument("--out", default="", help="write the markdown table here (default: print only)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
    p.add_argument("--force", action="store_true", help="recompile rows that already have a report")
    args = p.parse_args(argv)
    rows = []
    for case in args.case:
        rows.append((case, run_case(case, args)))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
