"""Rematerialisation policies for the scanned decoder layer (``model.remat_policy``).

| policy          | saved between forward and backward (per layer)            | memory | recompute |
|-----------------|-----------------------------------------------------------|--------|-----------|
| ``none``        | everything (no ``jax.checkpoint``)                        | most   | none      |
| ``dots``        | every matmul output (``checkpoint_dots``)                 | high   | elementwise only |
| ``dots_no_batch``| matmuls without batch dims (``dots_with_no_batch_dims_saveable``): the projections, not the attention scores | high | attention + elementwise |
| ``qkv_out_offload_mlp`` | as ``qkv_out`` on the device, the MLP's gate/up outputs (``mlp_gate``, ``mlp_up``) in host memory | device: as ``qkv_out``, host: high | o_proj, elementwise |
| ``qkv_out_up``  | as ``qkv_out``, plus the MLP's up output (``mlp_up``)      | medium-high | o_proj, MLP gate |
| ``qkv_out``     | tensors tagged ``qkv``, ``attn_out``, ``attn_lse`` (post-RoPE q/k/v, the attention output and, from the Pallas kernel, its log-sum-exp) | medium-low | o_proj, MLP gate/up |
| ``offload_qkv_out`` | ``qkv``/``attn_out`` moved to host memory, ``attn_lse`` on the device | low | as ``qkv_out`` |
| ``full``        | only the layer input (the scan carry)                     | least  | whole layer |

``SEARCH_ORDER`` lists them from the least recompute to the most: compile mode's
``--config.compile.search_remat`` compiles them in that order and keeps the first that fits with the
HBM headroom asked for (sgt_jax/compile.py). ``full`` is the 7B default. Tags are placed with
``jax.ad_checkpoint.checkpoint_name`` in qwen2_mot.py (``qkv``; ``attn_out`` on the chunked/dense
attention output), in the Pallas kernel's forward rule (kernels/flash_bagel.py: ``attn_out`` on its output,
``attn_lse`` on its log-sum-exp, so a policy saving them spares the kernel's forward recompute) and in
layers.py ``SwiGLU`` (``mlp_gate``, ``mlp_up``). The ViT layers carry only the kernel's tags, so the
tag-based policies rematerialise the rest of them. Offloading needs a backend with ``pinned_host``
memory (TPU; the CPU backend has it too, and there every policy's gradients equal the no-remat ones,
tests/unit/test_qwen2_mot.py); offloading is not measured on a TPU yet.
"""

from __future__ import annotations

from typing import Callable

import jax

POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_out_up", "qkv_out", "qkv_out_offload_mlp", "offload_qkv_out")
# offload_qkv_out is left out: it recomputes as much as qkv_out and only moves its residuals to the host.
SEARCH_ORDER = ("dots", "dots_no_batch", "qkv_out_offload_mlp", "qkv_out_up", "qkv_out", "full")


def _policy(name: str):
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "dots":
        return cp.checkpoint_dots
    if name == "dots_no_batch":
        return cp.dots_with_no_batch_dims_saveable
    if name == "qkv_out_up":
        return cp.save_only_these_names("qkv", "attn_out", "attn_lse", "mlp_up")
    if name == "qkv_out":
        return cp.save_only_these_names("qkv", "attn_out", "attn_lse")
    if name == "qkv_out_offload_mlp":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=["qkv", "attn_out", "attn_lse"],
            names_which_can_be_offloaded=["mlp_gate", "mlp_up"],
            offload_src="device", offload_dst="pinned_host")
    if name == "offload_qkv_out":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=["attn_lse"], names_which_can_be_offloaded=["qkv", "attn_out"],
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"unknown model.remat_policy {name!r}; choose one of {POLICIES}")


def remat(fn: Callable, policy: str) -> Callable:
    """Wrap ``fn`` (a scan body) according to ``policy``; unknown names are an error."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=_policy(policy), prevent_cse=False)
