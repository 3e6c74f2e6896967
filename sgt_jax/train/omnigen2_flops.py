"""OmniGen2's model FLOPs estimate and its compile-mode report (``--mode compile`` with an omnigen2 config).

Model FLOPs per step are a 6·N·tokens estimate over the matmul parameters each row really uses:
  every row:   the MLLM's decoder layers on its T text tokens, the vision tower on its P patches;
  seg rows:    the DiT on the condition (T tokens through the context refiner and the joint layers) and
               the target tokens (noise refiner + joint layers), the VAE encoder not counted (frozen,
               forward only);
  VQA rows:    the LM head on the L labelled positions.
A frozen part (``config.train.freeze``) counts 4·N·tokens when a trained part feeds it (its input gradient
is still computed) and 2·N·tokens when none does. The training loop's MFU uses the same estimate.
Attention score FLOPs are not counted. The traced program's FLOPs (sgt_jax/compile.py ``traced_counts``,
every branch of the DiT's ``lax.cond`` included) over this estimate is the executed / model ratio; full
remat recomputes the forward, so ~4/3 is the floor for remat "full".
"""

from __future__ import annotations

import time

import jax
from flax import nnx

from sgt_jax.models.omnigen2 import OmniGen2
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train import flops as flops_lib
from sgt_jax.train.freeze import frozen_groups


def _count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def param_counts(model_cfg) -> dict[str, int]:
    """Parameters by part (abstract: nothing allocated)."""
    with nnx.use_eager_sharding(False):
        m = nnx.state(nnx.eval_shape(lambda: OmniGen2(model_cfg, rngs=nnx.Rngs(0), with_vae=False)), nnx.Param)
    p = m.to_pure_dict()
    lm = p["mllm"]["language_model"]
    dit = p["dit"]
    joint = _count(dit["layers"])
    return {"text_layers": _count(lm["layers"]), "vision": _count(p["mllm"]["visual"]),
            "lm_head": int(model_cfg.mllm.text.hidden_size) * int(model_cfg.mllm.text.vocab_size),
            "dit_joint": joint, "dit_context": _count(dit["context_refiner"]) + _count(dit["caption_proj"]),
            "dit_noise": _count(dit["noise_refiner"]) + _count(dit["x_embedder"]) + _count(dit["norm_out"])}


# The parts' module graph for sgt_jax/train/flops.py's frozen-part multiplier: the vision tower feeds the
# LLM, the LLM feeds the LM head (VQA rows) and the DiT's condition (seg rows); each part's freeze group.
_PARENTS = {"vision": (), "mllm_text": ("vision",), "lm_head": ("mllm_text",), "dit": ("mllm_text",)}
_GROUP = {"vision": "mllm_vision", "mllm_text": "mllm_text", "lm_head": "mllm_text", "dit": "dit"}


def pass_factor(part: str, frozen) -> int:
    """FLOPs per parameter per token: 6 trained (forward + both backward matmuls), 4 frozen with a trained
    part upstream (forward + the input gradient), 2 frozen with nothing trained upstream (forward only);
    ``frozen``: the frozen freeze groups."""
    frozen_parts = {p for p in _PARENTS if _GROUP[p] in frozen}
    return 2 * flops_lib.pass_multiplier(part, frozen_parts, parents=_PARENTS)


def model_flops(config) -> dict[str, float]:
    """The 6·N·tokens estimate per step (module doc), by part; frozen parts (``config.train.freeze``) count
    4·N or 2·N (:func:`pass_factor`)."""
    frozen = frozen_groups(config)
    d, q = config.data.omnigen2, config.data.quota
    rows = int(config.data.packs_per_batch)
    seg = rows * int(q.seg) // (int(q.seg) + int(q.vqa))
    vqa = rows - seg
    t, p, l = int(d.text_tokens), int(d.vit_patches), int(d.ce_labels)
    stride = 2 ** (len(config.model.vae.ch_mult) - 1) * int(config.model.dit.patch_size)
    n_tgt = (int(d.target_max_side) // stride) ** 2
    cond = min(t, int(config.model.dit.axes_lens[0]) - 128)
    n = param_counts(config.model)
    f = {part: pass_factor(part, frozen) for part in _PARENTS}
    out = {"mllm_text": f["mllm_text"] * n["text_layers"] * t * rows, "vision": f["vision"] * n["vision"] * p * rows,
           "lm_head": f["lm_head"] * n["lm_head"] * l * vqa,
           "dit": f["dit"] * seg * (n["dit_joint"] * (cond + n_tgt) + n["dit_context"] * cond
                                     + n["dit_noise"] * n_tgt)}
    out["total"] = float(sum(out.values()))
    return out


def compile_report(config, devices, spec, num_slices: int, builder, progress, count_oom_flops: bool) -> dict:
    """Compile OmniGen2's train step over ``devices`` (abstract TPU devices) and report memory and FLOPs."""
    from sgt_jax.compile import compile_and_analyse, traced_counts

    n = len(devices)
    rows = int(config.data.packs_per_batch)
    d = config.data.omnigen2
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    progress(f"{spec.name}: {n} abstract devices, mesh {dict(mesh.shape)}; building the abstract train state")
    jitted, args = builder(config, mesh)
    tokens = int(d.text_tokens) + int(d.vit_patches)
    report = {"family": "omnigen2", "topology": spec.name, "libtpu_topology": spec.libtpu_name,
              "num_chips": spec.num_chips, "num_slices": num_slices, "num_devices": n,
              "hosts": spec.hosts * num_slices, "chip": spec.chip.name,
              "chip_peak_bf16_flops": spec.chip.peak_bf16_flops, "mesh": dict(mesh.shape),
              "packs_per_step": rows, "tokens_per_pack": tokens, "tokens_per_chip": rows * tokens / n,
              "variant": config.variant, "row_budgets": d.to_dict(), "remat_policy": str(config.model.remat_policy),
              "latents": str(config.data.latents), "microbatches": int(config.train.microbatches),
              "mu_dtype": str(config.optim.mu_dtype), "ema_dtype": str(config.train.ema_dtype)}
    report.update(compile_and_analyse(jitted, args, hbm_bytes=spec.chip.hbm_bytes, progress=progress))
    if not report["fits"] and not count_oom_flops:
        return report
    progress("counting the traced program's FLOPs")
    est = model_flops(config)
    t0 = time.time()
    counts = traced_counts(jitted, *args)
    traced = counts["dot_general"] + counts["conv"]
    report.update({"analytic_flops": est["total"], "analytic_by_module": est, "six_n_tokens_flops": est["total"],
                   "traced_flops": traced, "traced_over_analytic": traced / est["total"],
                   "traced_over_analytic_plus_remat": traced / (est["total"] * 4 / 3),
                   "skippable_flops": counts["cond_skippable"], "trace_s": time.time() - t0})
    return report
