"""Rematerialisation policies for the scanned decoder layer (``model.remat_policy``).

| policy          | saved between forward and backward (per layer)            | memory | recompute |
|-----------------|-----------------------------------------------------------|--------|-----------|
| ``none``        | everything (no ``jax.checkpoint``)                        | most   | none      |
| ``full``        | only the layer input (the scan carry)                     | least  | whole layer |
| ``dots``        | every matmul output (``checkpoint_dots``)                 | high   | elementwise only |
| ``dots_no_batch``| matmuls without batch dims (``dots_with_no_batch_dims_saveable``): the projections, not the attention scores | medium | attention + elementwise |
| ``qkv_out``     | tensors tagged ``qkv`` and ``attn_out`` (post-RoPE q/k/v and the attention context) | medium-low | MLP, projections |

``full`` is the 7B default (a 16k-token pack per chip). Tags are placed with
``jax.ad_checkpoint.checkpoint_name`` in qwen2_mot.py.
"""

from __future__ import annotations

from typing import Callable

import jax

POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_out")


def remat(fn: Callable, policy: str) -> Callable:
    """Wrap ``fn`` (a scan body) according to ``policy``; unknown names are an error."""
    cp = jax.checkpoint_policies
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=cp.nothing_saveable, prevent_cse=False)
    if policy == "dots":
        return jax.checkpoint(fn, policy=cp.checkpoint_dots, prevent_cse=False)
    if policy == "dots_no_batch":
        return jax.checkpoint(fn, policy=cp.dots_with_no_batch_dims_saveable, prevent_cse=False)
    if policy == "qkv_out":
        return jax.checkpoint(fn, policy=cp.save_only_these_names("qkv", "attn_out"), prevent_cse=False)
    raise ValueError(f"unknown model.remat_policy {policy!r}; choose one of {POLICIES}")
