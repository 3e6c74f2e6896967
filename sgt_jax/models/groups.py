"""The parameter groups of the Bagel and OmniGen2 models: every parameter path belongs to exactly one group.

The groups are the units of freezing (sgt_jax/train/freeze.py, ``config.train.freeze``) and the split a
training checkpoint stores trainable and frozen parameters by (sgt_jax/checkpoint/store.py). They are
listed with their members in sgt_jax/train/freeze.py.
"""

from __future__ import annotations

from collections.abc import Sequence

BAGEL_GROUPS = ("vit", "connector", "und", "gen", "embeddings", "lm_head", "vae")
OMNIGEN2_GROUPS = ("mllm_vision", "mllm_text", "dit", "vae")  # Qwen2.5-VL's vision tower, its LLM, the DiT
GROUPS = BAGEL_GROUPS + OMNIGEN2_GROUPS[:-1]


def group_of(path: Sequence[str]) -> str:
    """The freeze group of a parameter path (tuple of names, e.g. ('llm', 'layers', 'und', ...))."""
    p = tuple(str(x) for x in path)
    head = p[0] if p else ""
    if head in ("vit", "connector", "vae"):
        return head
    if head == "mllm" and len(p) > 1:
        return "mllm_vision" if p[1] == "visual" else "mllm_text"
    if head == "dit":
        return "dit"
    if head in ("vae2llm", "llm2vae", "time_embedder"):
        return "gen"
    if head == "llm" and len(p) > 1:
        sub = p[1]
        if sub == "layers" and len(p) > 2 and p[2] in ("und", "gen"):
            return p[2]
        if sub == "norm":
            return "und"
        if sub == "norm_gen":
            return "gen"
        if sub == "embed_tokens":
            return "embeddings"
        if sub == "lm_head":
            return "lm_head"
    raise ValueError(f"parameter {'/'.join(p)} belongs to no freeze group; update sgt_jax/models/groups.py")
