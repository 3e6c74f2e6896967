"""Share of (query block, key block) pairs the chunked attention computes in real 7B-shaped packs.

The chunked attention (sgt_jax/models/attention.py) skips a block pair whose BAGEL mask is all False.
How many pairs are live depends on the pack: und queries never see noised latents, latents see their
own image and their document's context, documents never see each other. This script packs batches with
the REAL pipeline (transforms, plans, packer, 2:1 seg:VQA quota) at the 7b budgets, from the built-in
synthetic world with SA-1B-like image sizes and the local word-level tokenizer (no download; text
lengths differ from Qwen2 BPE, images dominate the token count), and counts live blocks of the LLM
attention at ``model.attention_chunk`` (or ``--chunk``: the Pallas kernel's block), and of the ViT's
block-diagonal attention over the patch stream. The results are what ``config.compile.attention_live_fraction``
and ``config.compile.vit_live_fraction`` take (compile mode turns them into executed FLOPs).

    .venv/bin/python bench/attention_live_blocks.py [--batches 4] [--out bench/results/attention_blocks.md]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sgt_jax.configs_util import load_config
from sgt_jax.data.pipeline import make_train_iterator
from sgt_jax.models.attention import FULL, TokenMeta, live_block_fraction

SIZES = ((1024, 768), (768, 1024), (1024, 1024), (1024, 683))  # SA-1B-like (h, w)


def measure(batches: int, chunk: int | None = None, quota_mode: str = "") -> dict:
    cfg = load_config("configs/bagel_sgt.py:7b")
    with cfg.unlocked():
        for grp in ("seg", "vqa"):
            cfg.data.sources[grp].kind = "synthetic"
        cfg.data.sources.synthetic.sizes = SIZES
        cfg.data.sources.synthetic.num_samples = 4096
        cfg.data.tokenizer = "synthetic"
        cfg.model.tokens.update(dict(bos=1, eos=2, vision_start=3, vision_end=4))  # its special-token ids
        cfg.data.latents = "online"
        cfg.data.workers = 0
        cfg.data.packs_per_batch = 4
        if quota_mode:
            cfg.data.quota.mode = quota_mode
    chunk = int(chunk or cfg.model.attention_chunk)
    it = make_train_iterator(cfg)
    fractions, fill, vit = [], [], []
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        meta = TokenMeta(*(np.asarray(batch[k]) for k in ("doc", "split", "mode", "order")))
        fractions.append(live_block_fraction(meta, meta, chunk=chunk))
        img = np.asarray(batch["vit_image"])  # the ViT stream: image id as the document, one full split
        vmeta = TokenMeta(img, img, np.full_like(img, FULL), np.zeros_like(img))
        vit.append(live_block_fraction(vmeta, vmeta, chunk=chunk))
        fill.append(float(np.mean(meta.doc >= 0)))
    st = it.stats()
    return {"chunk": chunk, "quota_mode": cfg.data.quota.mode, "budget": dict(cfg.data.pack), "packs": batches * cfg.data.packs_per_batch,
            "live_fraction": float(np.mean(fractions)), "live_per_batch": fractions,
            "vit_live_fraction": float(np.mean(vit)), "vit_live_per_batch": vit,
            "token_fill": float(np.mean(fill)), "seg_per_vqa": st.get("seg_per_vqa"),
            "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4, help="batches of 4 packs to measure")
    ap.add_argument("--chunk", type=int, default=0, help="attention block (0: the 7b config's)")
    ap.add_argument("--quota-mode", default="", choices=["", "samples", "tokens"],
                    help="data.quota.mode ('' = the config's): 'tokens' packs denser")
    ap.add_argument("--out", default="", help="append a markdown row here")
    a = ap.parse_args()
    r = measure(a.batches, a.chunk or None, a.quota_mode)
    print(f"chunk {r['chunk']}, quota {r['quota_mode']}, {r['packs']} packs at {r['budget']}: live block fraction "
          f"{r['live_fraction']:.3f} (per batch {', '.join(f'{x:.3f}' for x in r['live_per_batch'])}); "
          f"ViT stream {r['vit_live_fraction']:.3f} (max {max(r['vit_live_per_batch']):.3f}); "
          f"token fill {r['token_fill']:.2f}; seg per vqa {r['seg_per_vqa']:.2f}; {r['seconds']:.0f}s")
    if a.out:
        with open(a.out, "a") as f:
            f.write(f"| {r['chunk']} | {r['quota_mode']} | {r['packs']} | {r['live_fraction']:.3f} | "
                    f"{min(r['live_per_batch']):.3f}-{max(r['live_per_batch']):.3f} | {r['token_fill']:.2f} | "
                    f"{r['vit_live_fraction']:.3f} ({min(r['vit_live_per_batch']):.3f}-"
                    f"{max(r['vit_live_per_batch']):.3f}) |\n")


if __name__ == "__main__":
    main()
