"""AOT-compile the real train step for a TPU topology on a machine without TPUs (``--mode compile``).

    python -m sgt_jax.main --mode compile --config configs/bagel_sgt.py:7b \\
        --config.compile.topology=v5p-16 --workdir runs/compile

Why: a 7B SGT step that does not fit in HBM should fail here, on a CPU box, in minutes, not after a
pod has been rented and the data pipeline has warmed up. With libtpu installed (``pip install
"jax[tpu]"``), ``jax.experimental.topologies.get_topology_desc`` gives *abstract* TPU devices; we build
the training mesh over them, lower the train step with ``ShapeDtypeStruct`` arguments carrying their
shardings and let the real TPU compiler compile it. The report (printed and written to
``<workdir>/compile_<topology>.json``) gives, per chip:

* HBM: argument / output / temp / alias / generated-code bytes (``memory_analysis``), their total
  against the chip's capacity, and a fits / does-not-fit verdict. A compile that runs out of HBM is a
  "does not fit" with the compiler's own message (the same error the pod would raise).
* FLOPs per step: (a) the analytic model FLOPs (sgt_jax/train/flops.py: MoT experts on their own tokens,
  LM head on labelled rows, causal-half attention), (b) the FLOPs the traced program executes, counted
  from its jaxpr with scan trip counts and remat recompute (``traced_flops``), and their ratio (remat of
  everything costs ≈ 4/3; causal masks executed densely add more), and (c) XLA's ``cost_analysis`` number
  as is. XLA's HloCostAnalysis counts a while-loop body **once**, so with scanned layers (c) undercounts
  by about the layer count; it is printed for reference only.

Topology names follow Cloud TPU accelerator types: ``v4-N`` and ``v5p-N`` count TensorCores (2 per
chip), ``v5litepod-N`` and ``v6e-N`` count chips. Only shapes are built: no parameter is materialised.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable

import jax
import numpy as np

from sgt_jax import parallel
from sgt_jax.data.packing import BatchLayout, empty_batch
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train import flops as flops_lib
from sgt_jax.train import step as step_lib
from sgt_jax.train.family import family
from sgt_jax.train.freeze import flops_frozen_modules
from sgt_jax.train.state import latents_online

# ---------------------------------------------------------------------------------------------------
# Topologies
# ---------------------------------------------------------------------------------------------------

# Chip-grid shapes by chip count. 3-D tori for v4/v5p, 2-D for v5e/v6e (Cloud TPU docs, "supported
# configurations" tables of each generation).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# accelerator-type prefix -> (chip key in flops.CHIPS, libtpu platform name, grid table, count unit)
_FAMILIES = {
    "v4": ("v4", "v4", _SHAPES_3D, "cores"),
    "v5p": ("v5p", "v5p", _SHAPES_3D, "cores"),
    "v5litepod": ("v5e", "v5e", _SHAPES_2D, "chips"),
    "v5e": ("v5e", "v5e", _SHAPES_2D, "chips"),
    "v6e": ("v6e", "v6e", _SHAPES_2D, "chips"),
}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """One slice: the accelerator type users type into gcloud, and what libtpu needs to describe it."""

    name: str  # e.g. "v5p-16"
    chip: flops_lib.Chip
    libtpu_name: str  # e.g. "v5p:2x2x2"
    num_chips: int
    chips_per_host: int

    @property
    def hosts(self) -> int:
        return max(1, self.num_chips // self.chips_per_host)

    def topology_kwargs(self) -> dict[str, Any]:
        grid = [int(x) for x in self.libtpu_name.split(":")[1].split("x")]
        kw: dict[str, Any] = {}
        if self.chip.name == "v4":  # v4 exposes each TensorCore unless told to fuse them (megacore)
            kw["chip_config_name"] = "megacore"
        if self.num_chips > self.chips_per_host:  # multi-host slice: 2x2 chips per host
            kw["chips_per_host_bounds"] = (2, 2, 1)
        elif len(grid) == 2:
            kw["chips_per_host_bounds"] = (grid[0], grid[1], 1)
        return kw


def parse_topology(name: str) -> TopologySpec:
    """``v5p-16`` -> TopologySpec(v5p, "v5p:2x2x2", 8 chips, 4 per host); errors list what is known."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip())
    if not m:
        raise ValueError(f"config.compile.topology={name!r}: expected <family>-<size>, family one of "
                         f"{sorted(_FAMILIES)}, e.g. v5p-16, v4-32, v5litepod-64, v6e-64")
    family, size = m.group(1), int(m.group(2))
    chip_key, platform, shapes, unit = _FAMILIES[family]
    chip = flops_lib.CHIPS[chip_key]
    if unit == "cores":
        if size % chip.cores_per_chip:
            raise ValueError(f"{name}: {family} sizes count TensorCores ({chip.cores_per_chip} per chip)")
        num_chips = size // chip.cores_per_chip
    else:
        num_chips = size
    if num_chips not in shapes:
        sizes = sorted(n * (chip.cores_per_chip if unit == "cores" else 1) for n in shapes)
        raise ValueError(f"{name}: unsupported size; known {family} sizes: {sizes}")
    per_host = 4 if num_chips >= 4 else num_chips
    if unit == "chips" and num_chips == 8:
        per_host = 8  # v5litepod-8 / v6e-8 are one 8-chip host
    return TopologySpec(name, chip, f"{platform}:{shapes[num_chips]}", num_chips, per_host)


def topology_devices(spec: TopologySpec, num_slices: int = 1) -> list:
    """Abstract TPU devices of ``num_slices`` slices of ``spec`` (needs libtpu, not a TPU)."""
    from jax.experimental import topologies

    if num_slices < 1:
        raise ValueError(f"config.compile.num_slices must be >= 1, got {num_slices}")
    # Describing a topology loads libtpu, which takes /tmp/libtpu_lockfile; any other JAX process on the
    # host (libtpu installed) may already hold it. We run nothing on a TPU, so sharing is harmless.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.libtpu_name,
                                            num_slices=num_slices, **spec.topology_kwargs())
    except Exception as err:  # libtpu missing or too old: say what to install
        raise RuntimeError(f"could not describe TPU topology {spec.libtpu_name} ({spec.name}): {err}. "
                           "Compile mode needs libtpu: pip install 'jax[tpu]==<your jax version>'") from err
    devices = list(desc.devices)
    if len(devices) != spec.num_chips * num_slices:
        raise RuntimeError(f"{spec.name}: libtpu gave {len(devices)} devices, expected "
                           f"{spec.num_chips * num_slices}")
    return devices


# ---------------------------------------------------------------------------------------------------
# FLOPs of the traced program (scan trip counts and remat recompute included)
# ---------------------------------------------------------------------------------------------------


def _dot_flops(eqn) -> int:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lc)
    batch = math.prod(lhs.shape[d] for d in lb)
    lfree = math.prod(s for i, s in enumerate(lhs.shape) if i not in lc and i not in lb)
    rfree = math.prod(s for i, s in enumerate(rhs.shape) if i not in rc and i not in rb)
    return 2 * batch * lfree * rfree * contract


def _conv_flops(eqn) -> int:
    out = eqn.outvars[0].aval
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
    kernel_spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_per_group = rhs.shape[rhs_spec[1]]
    return 2 * math.prod(out.shape) * kernel_spatial * in_per_group


def _sub_jaxprs(eqn):
    from jax.extend import core as jcore

    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item


# the Pallas attention kernel's block-pair FLOPs (every pair; the executed share is the live fraction)
KERNEL_KEYS = ("kernel_llm", "kernel_vit")


def jaxpr_flops(jaxpr, multiplier: int = 1, acc: dict | None = None) -> dict[str, int]:
    """Matmul + conv FLOPs of a jaxpr, recursing into sub-jaxprs; a scan body counts ``length`` times,
    a ``cond`` counts its most expensive branch, a ``while`` body once (flagged in ``while_loops``)."""
    acc = {"dot_general": 0, "conv": 0, "while_loops": 0, "cond_skippable": 0, **{k: 0 for k in KERNEL_KEYS}} \
        if acc is None else acc
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call":
            # A kernel's body is one block's program, not its work: count the cost estimate the kernel
            # declares (the attention kernel: every block pair, sgt_jax/models/kernels/flash_bagel.py).
            est = eqn.params.get("cost_estimate")
            if est is None:
                raise ValueError(f"pallas_call {eqn.params.get('name')!r} declares no cost_estimate; "
                                 "its FLOPs cannot be counted")
            key = "kernel_vit" if str(eqn.params.get("name", "")).startswith("vit_") else "kernel_llm"
            acc["dot_general"] += multiplier * int(est.flops)
            acc[key] += multiplier * int(est.flops)
            continue
        if name == "shard_map":  # the body sees one device's shard; every device of the mesh runs it
            for sub in _sub_jaxprs(eqn):
                jaxpr_flops(sub, multiplier * int(eqn.params["mesh"].size), acc)
            continue
        if name == "dot_general":
            acc["dot_general"] += multiplier * _dot_flops(eqn)
        elif name == "conv_general_dilated":
            acc["conv"] += multiplier * _conv_flops(eqn)
        elif name == "cond":
            branch_costs = [jaxpr_flops(b.jaxpr, multiplier) for b in eqn.params["branches"]]
            cost = [c["dot_general"] + c["conv"] for c in branch_costs]
            best = branch_costs[cost.index(max(cost))]
            for k in acc:
                if k != "cond_skippable":
                    acc[k] += best[k]
            # what the cheapest path through this cond (its branches' own conds included) would save over
            # the bound (in the step: the dead attention blocks; the NaN-skip cond holds no matmul)
            least = min(c - bc["cond_skippable"] for c, bc in zip(cost, branch_costs))
            acc["cond_skippable"] += max(cost) - least
            continue
        if name == "while":
            acc["while_loops"] += 1
        inner = multiplier * (int(eqn.params["length"]) if name == "scan" else 1)
        for sub in _sub_jaxprs(eqn):
            jaxpr_flops(sub, inner, acc)
    return acc


def traced_counts(fn: Callable, *args) -> dict[str, int]:
    """``jaxpr_flops`` of ``fn(*args)``'s jaxpr (shapes only)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def traced_flops(fn: Callable, *args, with_skippable: bool = False):
    """Global FLOPs (matmuls + convs) that ``fn(*args)`` executes, from its jaxpr (shapes only), every
    ``cond`` at its most expensive branch and every Pallas attention kernel at all its block pairs (an
    upper bound). With ``with_skippable``, returns ``(flops, skippable)``: the part of that bound that
    cheaper cond branches would not execute (the chunked attention's dead key blocks,
    sgt_jax/models/attention.py); the kernels' all-pairs share is in ``traced_counts``."""
    counts = traced_counts(fn, *args)
    total = counts["dot_general"] + counts["conv"]
    return (total, counts["cond_skippable"]) if with_skippable else total


# ---------------------------------------------------------------------------------------------------
# Compile and report
# ---------------------------------------------------------------------------------------------------

_OOM = re.compile(r"RESOURCE_EXHAUSTED|Ran out of memory|exceeds available HBM|out of memory", re.I)


def compile_and_analyse(jitted, args: tuple, *, hbm_bytes: int, progress: Callable[[str], None] = lambda m: None
                        ) -> dict[str, Any]:
    """Lower + compile ``jitted(*args)``; return per-device memory, XLA FLOPs and a fits verdict.

    An out-of-memory compile error is a result (``fits: False`` with the compiler's message), any other
    error propagates.
    """
    t0 = time.time()
    progress("lowering the train step")
    lowered = jitted.lower(*args)
    t_lower = time.time() - t0
    progress(f"lowered in {t_lower:.1f}s; compiling with the TPU compiler (minutes for 7B)")
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - only OOM is a verdict, the rest re-raises
        if not _OOM.search(str(err)):
            raise
        # The first line is the verdict; the rest (the compiler's largest allocations, with their HLO
        # ops and shapes) is what to read when deciding what to shrink, so the report keeps it.
        msg = str(err).strip()
        return {"fits": False, "oom_message": msg.splitlines()[0][:2000], "oom_detail": msg[:200_000],
                "hbm_bytes": hbm_bytes,
                "lower_s": t_lower, "compile_s": time.time() - t0 - t_lower}
    t_compile = time.time() - t0 - t_lower
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    m = {f.replace("_size_in_bytes", "_bytes"): int(getattr(mem, f, 0) or 0) for f in fields}
    total = m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"] + \
        m["generated_code_bytes"]
    # host (pinned_host) memory the program uses: offloaded remat residuals, an offloaded EMA
    m["host_temp_bytes"] = int(getattr(mem, "host_temp_size_in_bytes", 0) or 0)
    m["host_argument_bytes"] = int(getattr(mem, "host_argument_size_in_bytes", 0) or 0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"fits": total <= hbm_bytes, **m, "total_bytes": total, "hbm_bytes": hbm_bytes,
            "hbm_fraction": total / hbm_bytes, "xla_flops_per_device": float((cost or {}).get("flops", 0.0)),
            "lower_s": t_lower, "compile_s": t_compile}


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    """Human-readable summary of a report dict (the JSON holds everything)."""
    lines = [f"== compile {r['topology']} ({r['libtpu_topology']}, {r['num_chips']} chips"
             f"{' x %d slices' % r['num_slices'] if r['num_slices'] > 1 else ''}, {r['chip']}) =="]
    lines.append(f"packs/step {r['packs_per_step']}  tokens/pack {r['tokens_per_pack']}  "
                 f"tokens/chip {r['tokens_per_chip']:.0f}  mesh {r['mesh']}  micro-batches "
                 f"{r.get('microbatches', 1)}  remat {r.get('remat_policy')}  Adam mu {r.get('mu_dtype')}")
    for row in r.get("remat_search", []):
        lines.append(f"  remat search: {row['policy']:<20} " + (
            f"{_gib(row['total_bytes'])} ({100 * row['hbm_fraction']:.1f}% of HBM"
            + (f", host {_gib(row['host_temp_bytes'])}" if row.get("host_temp_bytes") else "") + ")"
            if "total_bytes" in row else "timed out" if row.get("timed_out") else "compiler OOM") + (" <- chosen" if row["policy"] == r.get("chosen") else ""))
    if "remat_search" in r and not r.get("chosen"):
        lines.append(f"  remat search: no policy fits with {100 * r['hbm_headroom']:.0f}% HBM headroom; the "
                     "last one tried is reported below")
    if r["fits"] and "total_bytes" in r:
        lines.append(f"HBM per chip: arguments {_gib(r['argument_bytes'])}, outputs {_gib(r['output_bytes'])}, "
                     f"temp {_gib(r['temp_bytes'])}, aliased {_gib(r['alias_bytes'])}, code "
                     f"{_gib(r['generated_code_bytes'])} -> total {_gib(r['total_bytes'])} of "
                     f"{_gib(r['hbm_bytes'])} ({100 * r['hbm_fraction']:.1f}%)")
    elif "total_bytes" in r:
        lines.append(f"HBM per chip: total {_gib(r['total_bytes'])} of {_gib(r['hbm_bytes'])}")
    elif r.get("timed_out"):
        lines.append(f"compile timed out after {r.get('compile_s', 0):.0f} s (compile.candidate_timeout_s)")
    else:
        lines.append(f"compiler OOM: {r.get('oom_message', '')}")
    if "analytic_flops" in r:
        lines.append(f"FLOPs/step (global): analytic model {r['analytic_flops']:.3e} "
                     f"(6*N_active*tokens part {r['six_n_tokens_flops']:.3e}); traced program "
                     f"{r['traced_flops']:.3e} -> ratio {r['traced_over_analytic']:.2f}x "
                     f"({r['traced_over_analytic_plus_remat']:.2f}x over model + full-remat recompute)"
                     + (f"; every attention block counted (upper bound), {r['skippable_flops']:.3e} of it in "
                        "blocks skipped when dead" if r.get("skippable_flops") else ""))
    if "executed_flops" in r:
        lines.append(f"FLOPs executed with {r['attention_live_fraction']:.1%} of attention blocks live "
                     f"(config.compile.attention_live_fraction): {r['executed_flops']:.3e} -> ratio "
                     f"{r['executed_over_analytic']:.2f}x")
    if "xla_flops_per_device" in r:
        lines.append(f"XLA cost_analysis per device {r['xla_flops_per_device']:.3e} (counts scan bodies once)")
    lines.append(f"lower {r.get('lower_s', 0):.1f}s, compile {r.get('compile_s', 0):.1f}s")
    lines.append("VERDICT: " + ("FITS" if r["fits"] else "DOES NOT FIT"))
    return "\n".join(lines)


def abstract_batch(config, batch_sharding) -> dict:
    """ShapeDtypeStructs of one global batch (docs/interfaces.md §1) carrying the batch sharding; built
    from a 1-pack padding batch of the data layout, so the keys and dtypes are exactly what the loop feeds."""
    packs = int(config.data.packs_per_batch)
    if family(config) == "omnigen2":
        from sgt_jax.data import omnigen2_plan

        row = omnigen2_plan.padding_row(omnigen2_plan.PlanConfig.from_config(config))
        one = parallel.device_part({k: np.asarray(v)[None] for k, v in row.items()})
    else:
        one = parallel.device_part(empty_batch(BatchLayout.from_config(config), 1))
    shard = (lambda k: batch_sharding[k]) if isinstance(batch_sharding, dict) else (lambda k: batch_sharding)
    return {k: jax.ShapeDtypeStruct((packs,) + v.shape[1:], v.dtype, sharding=shard(k)) for k, v in one.items()}


def _build_train_step(config, mesh):
    """The real train step (sgt_jax/train/step.py ``build_train_step``) and its abstract arguments:
    ``(jitted_step, (abstract_state, abstract_batch))``, all ShapeDtypeStructs with NamedShardings."""
    jitted, abstract_state, batch_sharding = step_lib.build_train_step(config, mesh)
    return jitted, (abstract_state, abstract_batch(config, batch_sharding))


def _report_header(config, spec: TopologySpec, num_slices: int, mesh) -> dict[str, Any]:
    """What the report says about the run before any compile: topology, mesh, pack, settings."""
    budgets = flops_lib.budgets_from_config(config)
    packs, n = int(config.data.packs_per_batch), int(mesh.size)
    return {"topology": spec.name, "libtpu_topology": spec.libtpu_name, "num_chips": spec.num_chips,
            "num_slices": num_slices, "num_devices": n, "hosts": spec.hosts * num_slices,
            "chip": spec.chip.name, "chip_peak_bf16_flops": spec.chip.peak_bf16_flops,
            "mesh": dict(mesh.shape), "packs_per_step": packs, "tokens_per_pack": budgets.tokens,
            "tokens_per_chip": packs * budgets.tokens / n, "variant": config.variant,
            "pack_budgets": dataclasses.asdict(budgets), "remat_policy": str(config.model.remat_policy),
            "ema_dtype": str(config.train.ema_dtype), "latents": str(config.data.latents),
            "ema_offload": bool(config.train.ema_offload), "opt_offload": bool(config.train.opt_offload),
            "microbatches": int(config.train.microbatches), "mu_dtype": str(config.optim.mu_dtype)}


def compile_config(config, *, devices=None, spec: TopologySpec | None = None, num_slices: int = 1,
                   builder: Callable | None = None, progress: Callable[[str], None] = lambda m: None,
                   count_oom_flops: bool = True) -> dict[str, Any]:
    """Compile ``config``'s train step over ``devices`` and return the report dict; ``progress`` gets
    one-line status messages (compile mode prints them). ``count_oom_flops=False`` skips the FLOP count of
    a step that does not fit (the remat search)."""
    if spec is None:
        spec = parse_topology(config.compile.topology)
    if devices is None:
        devices = topology_devices(spec, num_slices)
    if family(config) == "omnigen2":
        from sgt_jax.train import omnigen2_flops

        return omnigen2_flops.compile_report(config, devices, spec, num_slices, builder or _build_train_step,
                                             progress, count_oom_flops)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    progress(f"{spec.name}: {len(devices)} abstract devices, mesh {dict(mesh.shape)}; building the abstract "
             "train state")
    jitted, args = (builder or _build_train_step)(config, mesh)
    report = _report_header(config, spec, num_slices, mesh)
    report.update(compile_and_analyse(jitted, args, hbm_bytes=spec.chip.hbm_bytes, progress=progress))
    if not report["fits"] and not count_oom_flops:
        return report
    progress("counting the traced program's FLOPs")
    report.update(count_flops(config, jitted, args))
    return report


def count_flops(config, jitted, args) -> dict[str, Any]:
    """The FLOP part of the report, from the traced program alone (no compile): analytic model FLOPs,
    traced FLOPs (every attention block), and executed FLOPs at the configured live fractions."""
    budgets = flops_lib.budgets_from_config(config)
    packs = int(config.data.packs_per_batch)
    analytic = flops_lib.step_flops(config.model, budgets, packs=packs, frozen=flops_frozen_modules(config),
                                    vae_online=latents_online(config))
    act = flops_lib.active_params(config.model)
    six_n = 6 * (act["llm_expert"] * budgets.tokens + act["lm_head"] * budgets.ce_labels +
                 (act["vit"] + act["connector"]) * budgets.vit_patches) * packs
    t0 = time.time()
    counts = traced_counts(jitted, *args)
    traced, skippable = counts["dot_general"] + counts["conv"], counts["cond_skippable"]
    kernels = {k: counts[k] for k in KERNEL_KEYS}
    report = {"analytic_flops": analytic.total, "analytic_by_module": dict(analytic.by_module),
              "remat_recompute_flops": analytic.remat_recompute_flops(), "six_n_tokens_flops": six_n,
              "traced_flops": traced, "traced_over_analytic": traced / analytic.total,
              "traced_over_analytic_plus_remat": traced / (analytic.total + analytic.remat_recompute_flops()),
              "skippable_flops": skippable, "kernel_flops": kernels, "trace_s": time.time() - t0}
    live = _fraction(config, "attention_live_fraction")
    vit_live = _fraction(config, "vit_live_fraction") if kernels["kernel_vit"] else 0.0
    if live and (vit_live or not kernels["kernel_vit"]):
        # executed = bound minus the dead blocks' share: of the chunked attention's skippable part and of
        # the LLM kernel's pairs at the LLM live fraction, of the ViT kernel's pairs at the ViT's
        executed = (traced - (1.0 - live) * (skippable + kernels["kernel_llm"])
                    - (1.0 - vit_live) * kernels["kernel_vit"])
        report.update({"attention_live_fraction": live, "executed_flops": executed,
                       "executed_over_analytic": executed / analytic.total})
        if kernels["kernel_vit"]:
            report["vit_live_fraction"] = vit_live
    return report


def _fraction(config, field: str) -> float:
    value = float(config.compile[field])
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"config.compile.{field} must be in [0, 1] (0: not given), got {value}")
    return value


def search_remat(config, *, headroom: float, candidates=None, timeout_s: float = 0.0,
                 on_row: Callable[[dict], None] = lambda row: None, **kw) -> dict[str, Any]:
    """Compile ``config`` with each remat policy of ``candidates`` (default ``remat.SEARCH_ORDER``: least
    recompute first) until one fits with ``headroom`` (a fraction of HBM) left; return its report with
    ``remat_search`` (every policy tried: its HBM total, OOM, or timeout) and ``chosen`` (None when none
    fits: the report is then the last policy's). ``timeout_s`` > 0 compiles each candidate in a child
    process killed after that many seconds (the row says ``timed_out``; the search goes on to the next,
    heavier policy); ``on_row`` gets each row as soon as it is known. ``kw`` goes to ``compile_config``."""
    from sgt_jax.models import remat as remat_lib  # noqa: PLC0415

    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"config.compile.hbm_headroom must be in [0, 1), got {headroom}")
    if timeout_s < 0:
        raise ValueError(f"config.compile.candidate_timeout_s must be >= 0, got {timeout_s}")
    candidates = tuple(candidates or remat_lib.SEARCH_ORDER)
    unknown = [c for c in candidates if c not in remat_lib.POLICIES]
    if unknown or not candidates:
        raise ValueError(f"config.compile.remat_candidates: unknown {unknown}; choose from {remat_lib.POLICIES}")
    progress = kw.get("progress", lambda m: None)
    tried, report = [], None
    for policy in candidates:
        config.model.remat_policy = policy
        progress(f"remat search: {policy}" + (f" (timeout {timeout_s:.0f} s)" if timeout_s else ""))
        if timeout_s:
            report = _compile_in_child(config, timeout_s, kw)
        else:
            report = compile_config(config, count_oom_flops=False, **kw)
        row = {"policy": policy, "fits": report["fits"], "compile_s": report.get("compile_s")}
        row.update({k: report[k] for k in ("total_bytes", "hbm_fraction", "host_temp_bytes", "timed_out")
                    if k in report})
        tried.append(row)
        on_row(row)
        if report["fits"] and report["hbm_fraction"] <= 1.0 - headroom:
            if timeout_s and family(config) != "omnigen2":  # the child compiled it: count FLOPs here (trace only)
                mesh = mesh_lib.make_mesh(config.mesh, kw.get("devices") or topology_devices(kw["spec"],
                                                                                            kw["num_slices"]))
                report.update(count_flops(config, *(kw.get("builder") or _build_train_step)(config, mesh)))
            report.update(remat_search=tried, chosen=policy, hbm_headroom=headroom)
            return report
    report.update(remat_search=tried, chosen=None, hbm_headroom=headroom)
    return report


def _child_compile(config, spec, num_slices, conn):  # runs in a spawned process (_compile_in_child)
    jax.config.update("jax_platforms", "cpu")
    conn.send(compile_config(config, spec=spec, num_slices=num_slices, count_oom_flops=False))
    conn.close()


def _compile_in_child(config, timeout_s: float, kw: dict) -> dict[str, Any]:
    """``compile_config`` in a fresh process, killed after ``timeout_s`` (a TPU compile cannot be interrupted
    in-process). Only the default builder crosses the process boundary."""
    import multiprocessing  # noqa: PLC0415

    if kw.get("builder") is not None or kw.get("devices") is not None:
        raise ValueError("compile.candidate_timeout_s compiles in a child process: it takes the topology "
                         "(spec, num_slices), not devices or a builder")
    spec = kw["spec"]
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_compile, args=(config, spec, kw.get("num_slices", 1), send), daemon=True)
    t0 = time.time()
    proc.start()
    send.close()
    report = recv.recv() if recv.poll(timeout_s) else None
    proc.join(5 if report is not None else 0)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if report is None:
        if proc.exitcode not in (None, 0, -9):
            raise RuntimeError(f"remat search: the compile of {config.model.remat_policy!r} failed in its "
                               f"child process (exit code {proc.exitcode}); run it without "
                               "compile.candidate_timeout_s to see the error")
        mesh = mesh_lib.make_mesh(config.mesh, topology_devices(spec, kw.get("num_slices", 1)))
        return {**_report_header(config, spec, kw.get("num_slices", 1), mesh), "fits": False, "timed_out": True,
                "hbm_bytes": spec.chip.hbm_bytes, "compile_s": time.time() - t0}
    return report


def _apply_compile_overrides(config):
    """``compile.packs_per_chip`` > 0 sets the global packs per step to packs_per_chip x chips."""
    c = config.compile
    spec = parse_topology(c.topology)
    num_slices = int(c.num_slices)
    packs_per_chip = int(c.packs_per_chip)
    if packs_per_chip < 0:
        raise ValueError(f"config.compile.packs_per_chip must be >= 0, got {packs_per_chip}")
    if packs_per_chip:  # an existing field: allowed on a locked ConfigDict
        config.data.packs_per_batch = packs_per_chip * spec.num_chips * num_slices
    return spec, num_slices


def run(config, args) -> int:
    """``--mode compile``: compile for ``config.compile.topology``, print the report, write its JSON."""
    if not config.compile.topology:
        raise ValueError("--mode compile needs --config.compile.topology=<type>, e.g. v5p-16, v4-32, "
                         "v5litepod-64, v6e-64")
    jax.config.update("jax_platforms", "cpu")  # the host backend; TPU devices are abstract
    spec, num_slices = _apply_compile_overrides(config)
    kw = dict(spec=spec, num_slices=num_slices, progress=lambda m: print(f"[compile] {m}", flush=True))
    if bool(config.compile.search_remat):
        os.makedirs(args.workdir, exist_ok=True)
        rows_path = os.path.join(args.workdir, f"remat_search_{spec.name}.jsonl")

        def on_row(row):  # each candidate's result is on disk as soon as it is known
            with open(rows_path, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")

        report = search_remat(config, headroom=float(config.compile.hbm_headroom),
                              candidates=tuple(config.compile.remat_candidates or ()),
                              timeout_s=float(config.compile.candidate_timeout_s), on_row=on_row, **kw)
    else:
        report = compile_config(config, **kw)
    text = format_report(report)
    print(text, flush=True)
    os.makedirs(args.workdir, exist_ok=True)
    suffix = f"_x{num_slices}" if num_slices > 1 else ""
    path = os.path.join(args.workdir, f"compile_{spec.name}{suffix}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"report: {path}")
    return 0
