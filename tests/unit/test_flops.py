"""Analytic FLOPs (sgt_jax/train/flops.py) against hand counts, term by term, on the tiny config."""

import itertools

import numpy as np
import pytest

from sgt_jax.configs_util import load_config
from sgt_jax.train import flops as F

# Tiny config: LLM H=64, 2 layers, 4 heads x 16, 2 kv heads, mlp 128, vocab 512; ViT d=32, mlp 64,
# 2 layers, patch 14 (588-dim patches), 70 patches per side; latent dim 2*2*4 = 16; timestep freq 256.
BUD = F.PackBudgets(und_tokens=96, gen_tokens=32, vit_patches=24, ce_labels=40)
PACKS = 2

# Forward FLOPs of ONE pack, written out by hand.
LAYER_MM = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate/up/down = 36864
HAND_FWD = {
    # 2 layers x (2 * weights * (U+Z) rows) + 2 layers x 4 * heads * head_dim * causal pairs of T=128
    "llm": 2 * (2 * 36864 * (96 + 32)) + 2 * (4 * 4 * 16 * (128 * 129 // 2)),
    "lm_head": 2 * 64 * 512 * 40,
    # patch embed 588->32 on 24 patches + 2 layers x (2*(4*32*32 + 2*32*64)*24 + 4*32*24*24)
    "vit": 2 * 588 * 32 * 24 + 2 * (2 * (4 * 32 * 32 + 2 * 32 * 64) * 24 + 4 * 32 * 24 * 24),
    "connector": 2 * (32 * 64 + 64 * 64) * 24,
    "vae2llm": 2 * 16 * 64 * 32,
    "time_embedder": 2 * (256 * 64 + 64 * 64) * 32,
    "llm2vae": 2 * 64 * 16 * 32,
    "embed": 0,
    "vae_encoder": 0,
}


@pytest.fixture(scope="module")
def model():
    return load_config("configs/sgt_tiny.py").model


def test_hand_numbers_are_what_we_think():
    assert LAYER_MM == 36864
    assert HAND_FWD["llm"] == 18_874_368 + 4_227_072
    assert HAND_FWD["vit"] == 903_168 + 2 * (393_216 + 73_728)


def test_step_flops_matches_hand_count_all_trainable(model):
    got = F.step_flops(model, BUD, packs=PACKS)
    for name, fwd in HAND_FWD.items():
        assert got.forward_by_module[name] == PACKS * fwd, name
        assert got.by_module[name] == 3 * PACKS * fwd, name  # everything but the (absent) VAE trains
    assert got.total == 3 * PACKS * sum(HAND_FWD.values())
    assert got.per_pack == 3 * sum(HAND_FWD.values())
    # full remat of the LLM and ViT stacks recomputes their forward once
    assert got.remat_recompute_flops() == PACKS * (HAND_FWD["llm"] + HAND_FWD["vit"])


def test_frozen_multipliers(model):
    # frozen ViT: nothing upstream trains -> forward only; connector still trains (x3)
    got = F.step_flops(model, BUD, frozen=("vit",))
    assert got.by_module["vit"] == HAND_FWD["vit"]
    assert got.by_module["connector"] == 3 * HAND_FWD["connector"]
    # frozen LLM with trainable inputs: input gradients still flow through it (x2)
    got = F.step_flops(model, BUD, frozen=("llm",))
    assert got.by_module["llm"] == 2 * HAND_FWD["llm"]
    assert F.pass_multiplier("vae2llm", {"vae_encoder"}) == 3
    with pytest.raises(ValueError, match="unknown module"):
        F.step_flops(model, BUD, frozen=("vitt",))


def test_vae_encoder_hand_count(model):
    # tiny FLUX encoder (ch 32, mult (1,2), 1 res block, z 4) on a 32x32 image
    conv = lambda h, w, k, ci, co: 2 * h * w * k * k * ci * co  # noqa: E731
    hand = (
        conv(32, 32, 3, 3, 32)  # conv_in
        + 2 * conv(32, 32, 3, 32, 32)  # level 0 res block (32->32)
        + conv(16, 16, 3, 32, 32)  # downsample to 16x16
        + conv(16, 16, 3, 32, 64) + conv(16, 16, 3, 64, 64) + conv(16, 16, 1, 32, 64)  # level 1 + nin
        + 2 * 2 * conv(16, 16, 3, 64, 64)  # mid: two res blocks
        + 4 * conv(16, 16, 1, 64, 64) + 2 * 2 * 256 * 256 * 64  # mid attention: q,k,v,proj + QK, PV
        + conv(16, 16, 3, 64, 8)  # conv_out to mean||logvar
    )
    assert hand == 176_619_520  # the sum, evaluated once by hand as a cross-check
    assert F.vae_encoder_flops(model.vae, 32, 32) == hand
    bud = F.PackBudgets(96, 32, 24, 40, vae_images=3, vae_canvas=(32, 32))
    got = F.step_flops(model, bud, vae_online=True)
    assert got.by_module["vae_encoder"] == 3 * hand  # frozen, nothing upstream: forward only
    with pytest.raises(ValueError, match="vae_canvas"):
        F.step_flops(model, BUD, vae_online=True)


def test_7b_expert_params_match_spec():
    m = load_config("configs/bagel_sgt.py:7b").model
    # the `ema.safetensors` of `ByteDance-Seed/BAGEL-7B-MoT`: 233,058,048 per expert layer incl. q/k/v biases (3584+512+512),
    # q/k norms (2x128) and the two RMSNorms (2x3584) -> matmul weights = 233,046,016
    assert F.llm_layer_matmul_params(m.llm) == 233_058_048 - (3584 + 512 + 512 + 256 + 7168)
    act = F.active_params(m)
    assert act["llm_expert"] == 28 * 233_046_016
    assert act["lm_head"] == 152064 * 3584
    # ViT: 26 layers of (4*1152^2 + 2*1152*4304) + patch embed 588*1152 (biases excluded)
    assert act["vit"] == 26 * (4 * 1152**2 + 2 * 1152 * 4304) + 588 * 1152


def _brute_pairs(doc, split, mode, order):
    n = 0
    for q, k in itertools.product(range(len(doc)), repeat=2):
        if doc[q] < 0 or doc[k] < 0 or doc[q] != doc[k]:
            continue
        same = split[q] == split[k]
        ok = order[k] <= order[q] or (same and mode[q] in (1, 2))
        if ok and not (mode[k] == 2 and not same):
            n += 1
    return n


def test_attended_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        # random pack: docs made of splits with random modes, then physically shuffled, plus padding
        doc, split, mode = [], [], []
        sid = 0
        for d in range(rng.integers(1, 4)):
            for _ in range(rng.integers(1, 5)):
                n, md = int(rng.integers(1, 6)), int(rng.integers(0, 3))
                doc += [d] * n
                split += [sid] * n
                mode += [md] * n
                sid += 1
        order = list(range(len(doc)))
        npad = int(rng.integers(0, 4))
        doc, split, mode, order = (np.array(a + [-1] * npad) for a in (doc, split, mode, order))
        perm = rng.permutation(len(doc))
        args = [a[perm] for a in (doc, split, mode, order)]
        assert F.attended_pairs(*args) == _brute_pairs(*args), trial


def test_mfu_and_chips():
    # 1e15 FLOPs in 1 s on 4 v5p chips (459e12 each)
    assert F.mfu(1e15, 1.0, 4, "v5p") == pytest.approx(1e15 / (4 * 459e12))
    assert F.mfu(2e12, 2.0, 1, 1e12) == pytest.approx(1.0)
    assert F.tflops_per_device(8e12, 2.0, 4) == pytest.approx(1.0)
    assert F.chip("v5litepod").peak_bf16_flops == 197e12
    assert F.chip("v6e").peak_bf16_flops == 918e12 and F.chip("v4").peak_bf16_flops == 275e12
    assert F.chip_from_device_kind("TPU v5") is F.CHIPS["v5p"] and F.chip_from_device_kind("cpu") is None
    assert F.chip_from_device_kind("TPU v6 lite").name == "v6e"
    with pytest.raises(ValueError, match="unknown TPU chip"):
        F.chip("v3")
    with pytest.raises(ValueError, match="must be > 0"):
        F.mfu(1.0, 0.0, 1, "v4")


def test_loop_peak_flops_uses_device_kind_table(monkeypatch):
    """MFU needs the chip's peak: the loop must map libtpu's device kinds (v5p reports "TPU v5", v6e
    "TPU v6 lite") through flops.chip_from_device_kind, and give None on CPU."""
    import types

    import jax

    from sgt_jax.train import flops as flops_lib
    from sgt_jax.train import loop

    config = types.SimpleNamespace(train=types.SimpleNamespace(peak_flops=0.0))
    for kind, chip in (("TPU v5", "v5p"), ("TPU v6 lite", "v6e"), ("TPU v5 lite", "v5e"), ("TPU v4", "v4")):
        monkeypatch.setattr(jax, "devices", lambda kind=kind: [types.SimpleNamespace(device_kind=kind)])
        assert loop._peak_flops(config) == flops_lib.chip(chip).peak_bf16_flops
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind="cpu")])
    assert loop._peak_flops(config) is None
    config = types.SimpleNamespace(train=types.SimpleNamespace(peak_flops=1e12))
    assert loop._peak_flops(config) == 1e12
