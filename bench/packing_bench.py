"""Packing efficiency (useful entries / static budget) for the default seg:VQA mix.

Two parts:
1. ``tiny``: the real pipeline (configs/sgt_tiny.py, synthetic world) for N batches: efficiency per budget,
   realised ratios, host time per batch.
2. ``7b``: the 7b budgets with simulated sample SIZES (no data needed): segmentation samples from SA-1B-like
   image sizes through the real SGT ViT/VAE transforms, VQA samples from LLaVA-OneVision-like image sizes
   (through the real VLM transform) and text lengths. Only the counts matter to the packer, so the real
   ``Mixer`` packs count-only plans. The size distributions are assumptions, stated below.

    .venv/bin/python bench/packing_bench.py [--batches 50] [--out bench/results/packing.md]
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
    return {"budget": dict(cfg.data.pack), "packs_per_batch": cfg.data.packs_per_batch, "sec_per_batch": dt, **st}


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


def bench_7b(batches: int, budget: PackBudget, packs: int, quota: dict) -> dict:
    cfg = load_config("configs/bagel_sgt.py:7b")
    tfm = Transforms.from_config(cfg)
    streams = {"seg": _SimStream("seg", tfm, 0), "vqa": _SimStream("vqa", tfm, 1)}
    over = {"seg": 0, "vqa": 0}

    class _Filter:  # the pipeline's over_budget rule (plans.check_budget) on the simulated plans
        def __init__(self, s):
            self.s = s

        def next(self):
            p = self.s.next()
            if any(p[k] > lim for k, lim in (("n_und", budget.und_tokens), ("n_gen", budget.gen_tokens),
                                             ("n_vit", budget.vit_patches), ("n_ce", budget.ce_labels),
                                             ("n_vae", budget.vae_images))):
                over[p["group"]] += 1
                return {"skip": "over_budget", "index": p["index"]}
            return p

    mixer = Mixer({g: _Filter(s) for g, s in streams.items()}, quota, budget, packs)
    use = {"und": 0, "gen": 0, "vit": 0, "ce": 0}
    for _ in range(batches):
        for plans in mixer.next_packs():
            for p in plans:
                use["und"] += p["n_und"]
                use["gen"] += p["n_gen"]
                use["vit"] += p["n_vit"]
                use["ce"] += p["n_ce"]
    n = batches * packs
    eff = {"und": use["und"] / (n * budget.und_tokens), "gen": use["gen"] / (n * budget.gen_tokens),
           "tokens": (use["und"] + use["gen"]) / (n * budget.total_tokens),
           "vit": use["vit"] / (n * budget.vit_patches), "ce": use["ce"] / (n * budget.ce_labels)}
    st = mixer.stats()
    return {"budget": budget, "packs": packs, "efficiency": eff, "samples_per_pack": (st["n_seg"] + st["n_vqa"]) / n,
            "over_budget": over, **{k: st[k] for k in ("n_seg", "n_vqa", "seg_token_share", "quota_breaks")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    lines = ["# Packing efficiency (bench/packing_bench.py)", ""]
    tiny = bench_tiny(args.batches)
    e = tiny["efficiency"]
    lines += [f"## tiny (real pipeline, synthetic world, {args.batches} batches)", "",
              f"budget {tiny['budget']}, {tiny['packs_per_batch']} packs/batch, quota 2:1 by samples", "",
              "| und | gen | tokens | vit | ce | vae slots | seg:vqa | seg token share | quota breaks | s/batch |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| {e['und']:.3f} | {e['gen']:.3f} | {e['tokens']:.3f} | {e['vit']:.3f} | {e['ce']:.3f} | "
              f"{e['vae']:.3f} | {tiny['n_seg']}:{tiny['n_vqa']} | {tiny['seg_token_share']:.3f} | "
              f"{tiny['quota_breaks']} | {tiny['sec_per_batch']:.4f} |", ""]
    lines += [f"## 7b budgets, simulated sample sizes ({args.batches} batches per row)", "",
              "| U / Z / P / L / NI | packs per process | quota | und | gen | tokens | vit | ce | samples/pack | "
              "seg token share | over budget (seg, vqa) | quota breaks |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    default = PackBudget(6144, 10240, 6144, 4096, 8)  # configs/bagel_sgt.py:7b
    even = PackBudget(8192, 8192, 6144, 4096, 8)
    samples, tokens = {"mode": "samples", "seg": 2, "vqa": 1}, {"mode": "tokens", "seg": 2, "vqa": 1}
    rows = [(even, 1, samples), (even, 4, samples), (default, 1, samples), (default, 4, samples),
            (default, 8, samples), (default, 1, tokens), (default, 4, tokens)]
    for bud, packs, quota in rows:
        r = bench_7b(args.batches, bud, packs, quota)
        e = r["efficiency"]
        lines.append(f"| {bud.und_tokens} / {bud.gen_tokens} / {bud.vit_patches} / {bud.ce_labels} / "
                     f"{bud.vae_images} | {packs} | {quota['mode']} 2:1 | {e['und']:.3f} | {e['gen']:.3f} | "
                     f"{e['tokens']:.3f} | {e['vit']:.3f} | {e['ce']:.3f} | {r['samples_per_pack']:.2f} | "
                     f"{r['seg_token_share']:.3f} | {r['over_budget']['seg']}, {r['over_budget']['vqa']} | "
                     f"{r['quota_breaks']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
