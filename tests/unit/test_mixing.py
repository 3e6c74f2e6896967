"""The mixer's candidate buffer: fill on an SA-1B/LLaVA-like length distribution, the exact 2:1 quota in every
batch, exact resume through JSON with a full buffer, and no sample waiting for ever (count-only plans)."""

import json

import numpy as np
import pytest

from sgt_jax.data.mixing import OVERDUE_FACTOR, Mixer
from sgt_jax.data.packing import PackBudget, PackUsage

# the 7b budgets and sample sizes of bench/packing_bench.py, divided by 16 (same shapes, fast)
BUDGET = PackBudget(und_tokens=416, gen_tokens=736, vit_patches=384, ce_labels=256, vae_images=8)
SAMPLES = {"mode": "samples", "seg": 2, "vqa": 1}


class _Stream:
    """Count-only plans; the plan at a position depends only on (group, position), like a real stream."""

    def __init__(self, group: str):
        self.group, self.pos = group, 0

    def fetch(self, i: int) -> dict:
        rng = np.random.default_rng([0 if self.group == "seg" else 1, i])
        if self.group == "seg":  # latent grids of 2250x1500 / 2000x1500 / 1500x1500 photos (60/30/10 %)
            gen = int(rng.choice([172, 192, 256], p=[0.6, 0.3, 0.1]))
            und = 12 + int(rng.integers(0, 6))
            plan = dict(n_und=und, n_gen=gen, n_vit=und - 4, n_ce=0, n_vae=1)
        else:  # VQA: 14 % text only, else one image; long-tailed text
            vit = 0 if rng.random() < 0.14 else int(rng.integers(60, 300))
            text = 4 + int(np.exp(rng.normal(np.log(15), 0.8)))
            und = min(vit + text, BUDGET.und_tokens)
            plan = dict(n_und=und, n_gen=0, n_vit=min(vit, und), n_ce=min(text // 2, 200), n_vae=0)
        return dict(plan, group=self.group, index=i, key=f"{self.group}{i}")

    def next(self) -> dict:
        self.pos += 1
        return self.fetch(self.pos - 1)


def _mixer(packs=4, buffer=16, quota=SAMPLES):
    return Mixer({"seg": _Stream("seg"), "vqa": _Stream("vqa")}, quota, BUDGET, packs, buffer)


def _fill(batches):
    used = sum(p["n_und"] + p["n_gen"] for packs in batches for plans in packs for p in plans)
    return used / (sum(len(packs) for packs in batches) * BUDGET.total_tokens)


def test_buffer_fills_packs_with_exact_quota():
    fills = {}
    for buffer in (1, 32):
        mixer = _mixer(buffer=buffer)
        batches = [mixer.next_packs() for _ in range(40)]
        for packs in batches:
            n = {g: sum(p["group"] == g for plans in packs for p in plans) for g in ("seg", "vqa")}
            assert n["seg"] == 2 * n["vqa"] > 0  # exact 2:1 in every batch
            for plans in packs:  # every pack within every budget
                usage = PackUsage()
                for p in plans:
                    assert usage.fits(p, BUDGET)
                    usage.add(p)
        assert mixer.stats()["quota_breaks"] == 0
        fills[buffer] = _fill(batches)
    assert fills[32] >= 0.88 and fills[32] > fills[1] + 0.05, fills


@pytest.mark.parametrize("quota", [SAMPLES, {"mode": "tokens", "seg": 2, "vqa": 1}])
def test_resume_with_a_full_buffer_is_exact(quota):
    mixer = _mixer(quota=quota)
    for _ in range(5):
        mixer.next_packs()
    state = json.loads(json.dumps(mixer.get_state()))
    positions = {g: s.pos for g, s in mixer.streams.items()}
    assert len(state["carry"]) >= 8  # the candidate buffer (topped up as it is used) is part of the state
    expected = [[[p["key"] for p in plans] for plans in mixer.next_packs()] for _ in range(6)]
    resumed = _mixer(quota=quota)
    for g, s in resumed.streams.items():
        s.pos = positions[g]
    resumed.set_state(state)
    got = [[[p["key"] for p in plans] for plans in resumed.next_packs()] for _ in range(6)]
    assert got == expected
    assert resumed.get_state() == mixer.get_state()


def test_no_sample_waits_for_ever():
    mixer = _mixer(buffer=8)
    used = set()
    for _ in range(60):
        for plans in mixer.next_packs():
            used.update(p["key"] for p in plans)
    for g, stream in mixer.streams.items():
        bound = stream.pos - 1 - OVERDUE_FACTOR * mixer.buffer - 2 * 8 * 4  # overdue, plus a batch's worth
        waiting = [c["index"] for c in mixer.cands[g]]
        assert min(waiting) >= bound, (g, min(waiting), bound)
        assert {f"{g}{i}" for i in range(bound)} <= used  # everything older was packed
