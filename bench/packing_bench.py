"""Packing efficiency (useful entries / static budget) for the default seg:VQA mix.

Three parts:
1. ``tiny``: the real pipeline (configs/sgt_tiny.py, synthetic world) for N batches: efficiency per budget,
   realised ratios, host time per batch.
2. ``7b``: 7b budgets with simulated sample SIZES (no data needed): segmentation samples from SA-1B-like
   image sizes through the real SGT ViT/VAE transforms, VQA samples from LLaVA-OneVision-like image sizes
   (through the real VLM transform) and text lengths. Only the counts matter to the packer, so the real
   ``Mixer`` packs count-only plans. The size distributions are assumptions, stated below.

    PYTHONPATH=. .venv/bin/python bench/packing_bench.py [--batches 200] [--out bench/results/packing.md]

The last line, ``7b token fill: F``, is the mean (und + gen) / (U + Z) of configs/bagel_sgt.py:7b's packs
(budget and pack_buffer from the config) with 4 packs per process (one host of a v5p-16) and the 2:1 sample
quota. A third part simulates the official trainer's packing rule on the same sizes (``official_packs``) and
prints real tokens, segmentation and VQA samples per step side by side with ours.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sgt_jax.configs_util import load_config
from sgt_jax.data.mixing import Mixer
from sgt_jax.data.packing import PackBudget
from sgt_jax.data.pipeline import make_train_iterator
from sgt_jax.data.transforms import Transforms


def bench_tiny(batches: int) -> dict:
    cfg = load_config("configs/sgt_tiny.py")
    it = make_train_iterator(cfg)
    next(it)  # warm-up (tokenizer, first decode)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = (time.perf_counter() - t0) / batches
    st = it.stats()
    return {"budget": dict(cfg.data.pack), "packs_per_batch": cfg.data.packs_per_batch, "sec_per_batch": dt,
            "pack_buffer": cfg.data.pack_buffer, **st}


class _SimStream:
    """Count-only plans drawn from assumed size distributions (7b transforms)."""

    def __init__(self, group: str, tfm: Transforms, seed: int):
        self.group, self.tfm = group, tfm
        self.rng = np.random.default_rng(seed)
        self.pos = 0

    def _seg(self) -> dict:
        # SA-1B: ~2250x1500 (3:2) mostly, some 4:3, portrait in ~15%; instruction 6-14 tokens, dropped p=0.1
        w, h = [(2250, 1500), (2000, 1500), (1500, 1500)][self.rng.choice(3, p=[0.6, 0.3, 0.1])]
        if self.rng.random() < 0.15:
            w, h = h, w
        vw, vh = self.tfm.sgt_vit.output_size(w, h)
        gw, gh = self.tfm.vae.output_size(w, h)
        n_vit = (vw // 14) * (vh // 14)
        text = 0 if self.rng.random() < 0.1 else int(self.rng.integers(6, 15)) + 2
        n_gen = (gw // 16) * (gh // 16)
        return dict(n_und=n_vit + 2 + text + 2, n_gen=n_gen, n_vit=n_vit, n_ce=0, n_vae=1)

    def _vqa(self) -> dict:
        # LLaVA-OV subset: 14% text-only (magpie), else 1 image (5% 2 images) of 300-1600 px sides;
        # 1-4 QA rounds; question 10-80 tokens, answer lognormal (median ~60, long tail to ~2k)
        n_img = 0 if self.rng.random() < 0.14 else (2 if self.rng.random() < 0.05 else 1)
        n_vit = 0
        for _ in range(n_img):
            w, h = (int(x) for x in self.rng.integers(300, 1600, size=2))
            vw, vh = self.tfm.vlm_vit.output_size(w, h, img_num=n_img)
            n_vit += (vw // 14) * (vh // 14)
        rounds = int(self.rng.integers(1, 5))
        q = int(self.rng.integers(10, 80, size=rounds).sum())
        a = np.minimum(np.exp(self.rng.normal(np.log(60), 1.0, size=rounds)).astype(int) + 1, 2000)
        n_text = q + int(a.sum()) + 4 * rounds  # two markers per split
        return dict(n_und=n_vit + 2 * n_img + n_text, n_gen=0, n_vit=n_vit, n_ce=int(a.sum()) + rounds, n_vae=0)

    def next(self) -> dict:
        plan = self._seg() if self.group == "seg" else self._vqa()
        plan.update(group=self.group, index=self.pos, key=f"{self.group}{self.pos}")
        self.pos += 1
        return plan


class _Filter:
    """The pipeline's over_budget rule (plans.check_budget) on a simulated stream; counts what it skips."""

    def __init__(self, stream, budget: PackBudget, over: dict):
        self.s, self.budget, self.over = stream, budget, over

    @property
    def pos(self):
        return self.s.pos

    def next(self):
        p = self.s.next()
        b = self.budget
        if any(p[k] > lim for k, lim in (("n_und", b.und_tokens), ("n_gen", b.gen_tokens), ("n_vit", b.vit_patches),
                                         ("n_ce", b.ce_labels), ("n_vae", b.vae_images))):
            self.over[p["group"]] += 1
            return {"skip": "over_budget", "index": p["index"]}
        return p


def bench_7b(batches: int, budget: PackBudget, packs: int, quota: dict, buffer: int) -> dict:
    """Our mixer on the simulated 7b sample sizes: per-budget efficiency and per-pack means."""
    tfm = Transforms.from_config(load_config("configs/bagel_sgt.py:7b"))
    over = {"seg": 0, "vqa": 0}
    streams = {g: _Filter(_SimStream(g, tfm, i), budget, over) for i, g in enumerate(("seg", "vqa"))}
    mixer = Mixer(streams, quota, budget, packs, buffer)
    use = {"und": 0, "gen": 0, "vit": 0, "ce": 0}
    t0 = time.perf_counter()
    for _ in range(batches):
        for plans in mixer.next_packs():
            for p in plans:
                for k in use:
                    use[k] += p["n_" + k]
    dt = (time.perf_counter() - t0) / batches
    n = batches * packs
    eff = {"und": use["und"] / (n * budget.und_tokens), "gen": use["gen"] / (n * budget.gen_tokens),
           "tokens": (use["und"] + use["gen"]) / (n * budget.total_tokens),
           "vit": use["vit"] / (n * budget.vit_patches), "ce": use["ce"] / (n * budget.ce_labels)}
    st = mixer.stats()
    return {"budget": budget, "packs": packs, "buffer": buffer, "efficiency": eff, "sec_per_batch": dt,
            "real_per_pack": (use["und"] + use["gen"]) / n, "seg_per_pack": st["n_seg"] / n,
            "vqa_per_pack": st["n_vqa"] / n, "over_budget": over,
            **{k: st[k] for k in ("n_seg", "n_vqa", "seg_token_share", "quota_breaks")}}


def official_packs(n_packs: int, seed: int = 0) -> dict:
    """The official trainer's packing rule (Bagel data/dataset_base.py ``PackedDataset.__iter__`` with SGT's
    train_sgt.sh values) on the same simulated sample sizes, one rank: a new pack first takes one sample of each
    mandatory group (sam190k and vlm_sft are both mandatory), then draws the group by weight (SAM 1, VQA 5);
    while the pack is shorter than prefer_buffer_before and the buffer is not empty, the oldest buffered sample
    comes first; a sample longer than max_num_tokens_per_sample is skipped; a sample that would push the pack
    over max_num_tokens is buffered (buffer < 50 and not from the buffer) or else the pack is emitted and that
    sample is DROPPED; a pack is emitted once it holds >= expected_num_tokens. A sample's length here is its
    und + gen tokens (our plans count the markers the official ``num_tokens + 2·len(plan)`` adds)."""
    expected, max_tokens, max_per_sample, prefer, max_buffer = 16384, 36864, 16384, 16384, 50
    tfm = Transforms.from_config(load_config("configs/bagel_sgt.py:7b"))
    streams = {"seg": _SimStream("seg", tfm, 10 + seed), "vqa": _SimStream("vqa", tfm, 20 + seed)}
    rng = np.random.default_rng(seed)
    weights = {"seg": 1.0, "vqa": 5.0}
    out = {"tokens": 0, "seg": 0, "vqa": 0, "dropped": 0, "skipped_long": 0}
    buffer, packs = [], 0
    cur, cur_n = 0, {"seg": 0, "vqa": 0}

    def emit():
        out["tokens"] += cur
        out["seg"] += cur_n["seg"]
        out["vqa"] += cur_n["vqa"]

    def length(p):
        return p["n_und"] + p["n_gen"]

    while packs < n_packs:
        if cur == 0:
            for g in ("seg", "vqa"):
                while True:
                    p = streams[g].next()
                    if length(p) < max_per_sample:
                        cur += length(p)
                        cur_n[g] += 1
                        break
                    out["skipped_long"] += 1
        if cur < prefer and buffer:
            p, from_buffer = buffer.pop(0), True
        else:
            g = "seg" if rng.random() < weights["seg"] / sum(weights.values()) else "vqa"
            p, from_buffer = streams[g].next(), False
        if length(p) > max_per_sample:
            out["skipped_long"] += 1
            continue
        if cur + length(p) > max_tokens:
            if len(buffer) < max_buffer and not from_buffer:
                buffer.append(p)
            else:
                emit()
                out["dropped"] += 1
                packs, cur, cur_n = packs + 1, 0, {"seg": 0, "vqa": 0}
            continue
        cur += length(p)
        cur_n[p["group"]] += 1
        if cur >= expected:
            emit()
            packs, cur, cur_n = packs + 1, 0, {"seg": 0, "vqa": 0}
    return {"real_per_pack": out["tokens"] / n_packs, "seg_per_pack": out["seg"] / n_packs,
            "vqa_per_pack": out["vqa"] / n_packs, "padded": max_tokens, "dropped": out["dropped"],
            "skipped_long": out["skipped_long"], "packs": n_packs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cfg7 = load_config("configs/bagel_sgt.py:7b")
    budget7, buffer7 = PackBudget.from_config(cfg7), int(cfg7.data.pack_buffer)
    lines = ["# Packing efficiency (bench/packing_bench.py)", ""]
    tiny = bench_tiny(args.batches)
    e = tiny["efficiency"]
    lines += [f"## tiny (real pipeline, synthetic world, {args.batches} batches)", "",
              f"budget {tiny['budget']}, {tiny['packs_per_batch']} packs/batch, quota 2:1 by samples, "
              f"pack_buffer {tiny['pack_buffer']}", "",
              "| und | gen | tokens | vit | ce | vae slots | seg:vqa | seg token share | quota breaks | s/batch |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| {e['und']:.3f} | {e['gen']:.3f} | {e['tokens']:.3f} | {e['vit']:.3f} | {e['ce']:.3f} | "
              f"{e['vae']:.3f} | {tiny['n_seg']}:{tiny['n_vqa']} | {tiny['seg_token_share']:.3f} | "
              f"{tiny['quota_breaks']} | {tiny['sec_per_batch']:.4f} |", ""]
    lines += [f"## 7b budgets, simulated sample sizes ({args.batches} batches per row)", "",
              "| U / Z / P / L / NI | packs per process | quota | buffer | und | gen | tokens | vit | ce | "
              "seg/pack | vqa/pack | real tokens/pack | over budget (seg, vqa) | quota breaks | ms/batch |",
              "|" + "---|" * 15]
    old = PackBudget(6144, 10240, 6144, 4096, 8)  # the 7b budget before the candidate buffer
    volume = PackBudget(6656, 13824, 6144, 4096, 8)  # 20,480-token packs: closer to the official tokens per pack
    samples, tokens = {"mode": "samples", "seg": 2, "vqa": 1}, {"mode": "tokens", "seg": 2, "vqa": 1}
    rows = [(old, 4, samples, 1), (old, 4, samples, buffer7), (budget7, 1, samples, buffer7),
            (budget7, 4, samples, 16), (budget7, 8, samples, buffer7), (budget7, 4, tokens, buffer7),
            (volume, 4, samples, buffer7),
            (budget7, 4, samples, buffer7)]  # the last row: the 7b config on one host of 4 chips (v5p-16)
    results = []
    for bud, packs, quota, buf in rows:
        r = bench_7b(args.batches, bud, packs, quota, buf)
        results.append(r)
        e = r["efficiency"]
        lines.append(f"| {bud.und_tokens} / {bud.gen_tokens} / {bud.vit_patches} / {bud.ce_labels} / "
                     f"{bud.vae_images} | {packs} | {quota['mode']} 2:1 | {buf} | {e['und']:.3f} | {e['gen']:.3f} | "
                     f"{e['tokens']:.3f} | {e['vit']:.3f} | {e['ce']:.3f} | {r['seg_per_pack']:.2f} | "
                     f"{r['vqa_per_pack']:.2f} | {r['real_per_pack']:.0f} | {r['over_budget']['seg']}, "
                     f"{r['over_budget']['vqa']} | {r['quota_breaks']} | {1000 * r['sec_per_batch']:.0f} |")
    ours = results[-1]
    off = official_packs(args.batches * 4)
    steps = int(cfg7.data.packs_per_batch)
    per_step_official = off["real_per_pack"] * 8
    need = per_step_official / ours["real_per_pack"]
    lines += ["", f"## Per step: the official packing rule vs ours (same simulated sizes; official: 8 ranks, "
              f"{off['packs']} packs simulated)", "",
              "| | packs/step | real tokens/step | padded tokens/step | seg samples/step | VQA samples/step | "
              "seg:VQA | real tokens/pack |", "|---|---|---|---|---|---|---|---|",
              f"| official (expected 16,384, cap 36,864, flex-padded to the cap) | 8 | {per_step_official:,.0f} | "
              f"{8 * off['padded']:,} | {8 * off['seg_per_pack']:.1f} | {8 * off['vqa_per_pack']:.1f} | "
              f"{off['seg_per_pack'] / off['vqa_per_pack']:.2f} | {off['real_per_pack']:,.0f} |",
              f"| ours, configs/bagel_sgt.py:7b ({budget7.total_tokens:,}-token packs, 2:1) | {steps} | "
              f"{steps * ours['real_per_pack']:,.0f} | {steps * budget7.total_tokens:,} | "
              f"{steps * ours['seg_per_pack']:.1f} | {steps * ours['vqa_per_pack']:.1f} | "
              f"{ours['seg_per_pack'] / ours['vqa_per_pack']:.2f} | {ours['real_per_pack']:,.0f} |",
              "", f"Official samples dropped at a full pack: {off['dropped']} of {off['packs']} packs; "
              f"skipped as too long: {off['skipped_long']}. Packs per step for the official real tokens per step "
              f"with the 7b config: {need:.2f}."]
    lines += ["", f"7b token fill: {ours['efficiency']['tokens']:.3f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
