"""OmniGen2's model-FLOPs estimate (sgt_jax/train/omnigen2_flops.py) and the training loop's MFU numerator."""

from __future__ import annotations

import pytest

from sgt_jax.configs_util import load_config
from sgt_jax.train import loop, omnigen2_flops as F


@pytest.fixture(autouse=True)
def _counted_once(monkeypatch):
    """The part sizes of the tiny model, traced once per module (every case uses the same architecture)."""
    if not _COUNTS:
        _COUNTS.append(F.param_counts(_cfg().model))
    monkeypatch.setattr(F, "param_counts", lambda model_cfg: dict(_COUNTS[0]))


_COUNTS: list = []


def _cfg(**freeze):
    c = load_config("configs/omnigen2_sgt.py:tiny")
    for k, v in freeze.items():
        c.train.freeze[k] = v
    return c


def _per_factor(parts: dict, factors: dict) -> dict:
    """The by-part FLOPs divided by each part's factor: the parameter x token products."""
    return {k: parts[k] / factors[k] for k in factors}


def test_all_trained_is_six_n_tokens():
    c = _cfg()
    out = F.model_flops(c)
    n = F.param_counts(c.model)
    d = c.data.omnigen2
    rows = int(c.data.packs_per_batch)
    assert rows == 3  # 2 seg + 1 VQA at 2:1
    assert out["mllm_text"] == 6 * n["text_layers"] * int(d.text_tokens) * rows
    assert out["vision"] == 6 * n["vision"] * int(d.vit_patches) * rows
    assert out["lm_head"] == 6 * n["lm_head"] * int(d.ce_labels) * 1
    assert out["total"] == pytest.approx(sum(v for k, v in out.items() if k != "total"))
    assert min(out.values()) > 0


@pytest.mark.parametrize("freeze, factors", [
    ({}, {"vision": 6, "mllm_text": 6, "lm_head": 6, "dit": 6}),
    ({"dit": True}, {"vision": 6, "mllm_text": 6, "lm_head": 6, "dit": 4}),  # its input gradient feeds the MLLM
    ({"mllm_vision": True}, {"vision": 2, "mllm_text": 6, "lm_head": 6, "dit": 6}),  # at the input: forward only
    ({"mllm_vision": True, "mllm_text": True}, {"vision": 2, "mllm_text": 2, "lm_head": 2, "dit": 6}),
    ({"mllm_text": True}, {"vision": 6, "mllm_text": 4, "lm_head": 4, "dit": 6}),
    ({"mllm_vision": True, "mllm_text": True, "dit": True}, {"vision": 2, "mllm_text": 2, "lm_head": 2, "dit": 2}),
])
def test_frozen_parts_count_less(freeze, factors):
    base = F.model_flops(_cfg())
    out = F.model_flops(_cfg(**freeze))
    assert _per_factor(out, factors) == pytest.approx(_per_factor(base, {k: 6 for k in factors}))


def test_loop_mfu_numerator_uses_the_estimate():
    c = _cfg()
    assert loop._flops_per_step(c, global_packs=int(c.data.packs_per_batch)) == F.model_flops(c)["total"]
    c.train.peak_flops = 1e12
    assert loop._peak_flops(c) == 1e12
