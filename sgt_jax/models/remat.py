"""Rematerialisation policies for the scanned decoder layer (``model.remat_policy``).

| policy          | saved between forward and backward (per layer)            | memory | recompute |
|-----------------|-----------------------------------------------------------|--------|-----------|
| ``none``        | everything (no ``jax.checkpoint``)                        | most   | none      |
| ``dots``        | every matmul output (``checkpoint_dots``)                 | high   | elementwise only |
| ``qkv_out_offload_mlp`` | ``qkv``/``attn_out`` on the device, the MLP inputs (``mlp_in``: gate and up outputs) in host memory | device: medium-low, host: high | o_proj, elementwise |
| ``dots_no_batch``| matmuls without batch dims (``dots_with_no_batch_dims_saveable``): the projections, not the attention scores | high | attention + elementwise |
| ``qkv_out``     | tensors tagged ``qkv`` and ``attn_out`` (post-RoPE q/k/v and the attention context) | medium-low | o_proj, MLP gate/up |
| ``offload_qkv_out`` | ``qkv``/``attn_out`` moved to host memory, nothing kept on the device | low | as ``qkv_out`` |
| ``full``        | only the layer input (the scan carry)                     | least  | whole layer |

``SEARCH_ORDER`` lists them from the least recompute to the most: compile mode's
``--config.compile.search_remat`` compiles them in that order and keeps the first that fits with the
HBM headroom asked for (sgt_jax/compile.py). ``full`` is the 7B default. Tags are placed with
``jax.ad_checkpoint.checkpoint_name`` in qwen2_mot.py (``qkv``, ``attn_out``) and layers.py ``SwiGLU``
(``mlp_in``); the ViT layers carry no tags, so the tag-based policies rematerialise them fully.
Offloading needs a backend with ``pinned_host`` memory (TPU; not every CPU/GPU build). The offload policies
are experimental: on the CPU backend their gradients differ from the no-remat gradients by ~10 % (a known,
unexplained failure, kept as a strict xfail test), so the search does not try them.
"""

from __future__ import annotations

from typing import Callable

import jax

POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_out", "qkv_out_offload_mlp", "offload_qkv_out")
# The two offload policies are left out of the search: their gradients differ from the no-remat ones on the
# CPU backend (tests/unit/test_qwen2_mot.py, a strict xfail) and they are not verified on TPU yet.
SEARCH_ORDER = ("dots", "dots_no_batch", "qkv_out", "full")


def _policy(name: str):
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "dots":
        return cp.checkpoint_dots
    if name == "dots_no_batch":
        return cp.dots_with_no_batch_dims_saveable
    if name == "qkv_out":
        return cp.save_only_these_names("qkv", "attn_out")
    if name == "qkv_out_offload_mlp":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=["qkv", "attn_out"], names_which_can_be_offloaded=["mlp_in"],
            offload_src="device", offload_dst="pinned_host")
    if name == "offload_qkv_out":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=["qkv", "attn_out"],
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"unknown model.remat_policy {name!r}; choose one of {POLICIES}")


def remat(fn: Callable, policy: str) -> Callable:
    """Wrap ``fn`` (a scan body) according to ``policy``; unknown names are an error."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=_policy(policy), prevent_cse=False)
