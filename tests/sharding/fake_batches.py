"""Tiny packed batches that follow docs/interfaces.md §1, independent of sgt_jax/data.

Each pack holds one document: a causal text split, a ViT image (full attention), a second text split,
then one VAE target image (noise split) in the latent half. Some packs have padded latent rows and
invalid CE labels so every masking path is exercised. Used by the train tests so they do not depend
on the data pipeline's randomness.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from sgt_jax.configs_util import load_config


def small_config(packs: int = 2, latents: str = "online"):
    """The tiny config shrunk to test-size packs (U=24, Z=16, P=4, L=8, NI=1, 16 px VAE canvas)."""
    c = load_config("configs/sgt_tiny.py")
    c.data.pack.update(dict(und_tokens=24, gen_tokens=16, vit_patches=4, ce_labels=8, vae_images=1))
    c.data.transforms.vae = (16, 16, 4)
    c.data.packs_per_batch = packs
    c.data.latents = latents
    c.train.ce_chunk = 4
    c.train.platform = "any"
    return c


def make_batch(config, seed: int, packs: int | None = None) -> dict:
    pack = config.data.pack
    m = config.model
    b = packs or config.data.packs_per_batch
    u, z, p, lab, ni = pack.und_tokens, pack.gen_tokens, pack.vit_patches, pack.ce_labels, pack.vae_images
    t = u + z
    rng = np.random.default_rng(seed)
    i32 = np.int32
    out = {
        "tokens": np.zeros((b, t), i32), "kind": np.zeros((b, t), i32), "doc": np.full((b, t), -1, i32),
        "split": np.full((b, t), -1, i32), "mode": np.zeros((b, t), i32), "order": np.zeros((b, t), i32),
        "rope": np.zeros((b, t), i32), "vit_row": np.zeros((b, t), i32),
        "vit_patches": rng.uniform(-1, 1, (b, p, 3 * m.vit.patch_size ** 2)).astype(np.float32),
        "vit_pos": np.zeros((b, p), i32), "vit_image": np.zeros((b, p), i32),
        "latent_pos": np.zeros((b, z), i32), "latent_image": np.zeros((b, z), i32),
        "latent_target": np.ones((b, z), bool),
        "ce_pos": np.zeros((b, lab), i32), "ce_label": np.zeros((b, lab), i32), "ce_valid": np.ones((b, lab), bool),
        "n_seg": np.ones((b,), i32), "n_vqa": np.zeros((b,), i32),
    }
    side = int(np.sqrt(z))
    canvas = config.data.transforms.vae[0]
    for i in range(b):
        n_text1, n_text2 = 10, 4
        text = rng.integers(5, m.llm.vocab_size, n_text1 + n_text2)
        # und half: text1, vit, text2, pad
        pos = 0
        order = 0
        rope = 0
        for j in range(n_text1):
            out["tokens"][i, pos], out["kind"][i, pos] = text[j], 1
            out["doc"][i, pos], out["split"][i, pos], out["mode"][i, pos] = 0, 0, 0
            out["order"][i, pos], out["rope"][i, pos] = order, rope
            pos, order, rope = pos + 1, order + 1, rope + 1
        for j in range(p):
            out["kind"][i, pos], out["vit_row"][i, pos] = 2, j
            out["doc"][i, pos], out["split"][i, pos], out["mode"][i, pos] = 0, 1, 1
            out["order"][i, pos], out["rope"][i, pos] = order, rope
            pos, order = pos + 1, order + 1
        rope += 1
        for j in range(n_text2):
            out["tokens"][i, pos], out["kind"][i, pos] = text[n_text1 + j], 1
            out["doc"][i, pos], out["split"][i, pos], out["mode"][i, pos] = 0, 2, 0
            out["order"][i, pos], out["rope"][i, pos] = order, rope
            pos, order, rope = pos + 1, order + 1, rope + 1
        und_real = pos
        # gen half: one target image; odd packs leave the last quarter of rows as padding
        n_lat = z if i % 2 == 0 else z - z // 4
        for j in range(n_lat):
            q = u + j
            out["kind"][i, q] = 3
            out["doc"][i, q], out["split"][i, q], out["mode"][i, q] = 0, 3, 2
            out["order"][i, q], out["rope"][i, q] = order, rope
            order += 1
            out["latent_pos"][i, j] = (j // side) * m.max_latent_size + (j % side)
        out["latent_image"][i, n_lat:] = -1
        out["latent_target"][i, n_lat:] = False
        # pad tokens get the orders after all real tokens
        pads = [q for q in range(und_real, u)] + [u + j for j in range(n_lat, z)]
        for q in pads:
            out["order"][i, q] = order
            order += 1
        # vit patch stream: a 2x2 grid of image 0
        g = int(np.sqrt(p))
        out["vit_pos"][i] = [(r * m.vit.max_patches_per_side + c) for r in range(g) for c in range(g)][:p]
        # CE: text1 positions predict the next text token; odd packs mark the last two labels invalid
        out["ce_pos"][i] = np.arange(lab)
        out["ce_label"][i] = out["tokens"][i, 1:lab + 1]
        if i % 2:
            out["ce_valid"][i, lab - 2:] = False
    if config.data.latents == "online":
        out["vae_images"] = rng.uniform(-1, 1, (b, ni, canvas, canvas, 3)).astype(np.float32)
        rc = np.stack([np.arange(z) // side, np.arange(z) % side], -1).astype(i32)
        out["latent_rc"] = np.broadcast_to(rc, (b, z, 2)).copy()
    else:
        d = m.latent_patch_size ** 2 * m.vae.z_channels
        out["latent_mean"] = rng.normal(0, 1, (b, z, d)).astype(np.float32)
        out["latent_logvar"] = rng.uniform(-4, -1, (b, z, d)).astype(np.float32)
    return out


class FakeIterator:
    """A checkpointable iterator over ``make_batch(config, seed + k)`` (state = next k), with the
    per-process slicing of the real pipeline: process ``i`` of ``n`` yields rows ``i::n``... of the
    global batch, so several processes together see exactly the one-process batches."""

    def __init__(self, config, *, process_index: int = 0, process_count: int = 1, seed: int = 0):
        self.config, self.k, self.seed = config, 0, seed
        self.pi, self.pc = process_index, process_count
        b = config.data.packs_per_batch
        if b % process_count:
            raise ValueError(f"packs_per_batch {b} not divisible by {process_count} processes")
        self.local = b // process_count

    def __iter__(self):
        return self

    def __next__(self):
        full = make_batch(self.config, self.seed + self.k)
        self.k += 1
        lo = self.pi * self.local
        return {key: v[lo:lo + self.local] for key, v in full.items()}

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.k = int(state["k"])

    def stats(self):
        return {}


def row_crc(batch: dict, i: int) -> int:
    return zlib.crc32(np.ascontiguousarray(batch["tokens"][i]).tobytes())


class _SlowNanIterator(FakeIterator):
    """FakeIterator that sleeps per batch (so a test can kill the run mid-way) and can poison
    ``latent_mean`` with NaN from batch ``nan_from`` on."""

    def __init__(self, config, *, sleep: float, nan_from: int, **kw):
        super().__init__(config, **kw)
        self.sleep, self.nan_from = sleep, nan_from

    def __next__(self):
        import time

        k = self.k
        out = super().__next__()
        if self.sleep:
            time.sleep(self.sleep)
        if 0 <= self.nan_from <= k:
            out["latent_mean"] = np.full_like(out["latent_mean"], np.nan)
        log = os.environ.get("SGT_TEST_DATA_LOG")
        if log:  # which rows this process read: one crc per pack row
            with open(f"{log}.p{self.pi}", "a") as f:
                f.write(json.dumps([k] + [row_crc(out, i) for i in range(self.local)]) + "\n")
        return out


def main(argv) -> int:
    """``python -m tests.sharding.fake_batches WORKDIR STEPS EVERY PACKS [SLEEP] [NAN_FROM] [MAX_BAD]``:
    the training loop on fake batches with the small config (used by the subprocess tests)."""
    import functools

    from sgt_jax.mode_args import ModeArgs
    from sgt_jax.train import loop

    workdir, steps, every, packs = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    sleep = float(argv[4]) if len(argv) > 4 else 0.0
    nan_from = int(argv[5]) if len(argv) > 5 else -1
    cfg = small_config(packs=packs, latents="cached")
    cfg.train.steps, cfg.checkpoint.every = steps, every
    if len(argv) > 6:
        cfg.train.max_consecutive_nonfinite = int(argv[6])
    it = functools.partial(_SlowNanIterator, sleep=sleep, nan_from=nan_from)
    return loop.run(cfg, ModeArgs(workdir=workdir), iterator_fn=it)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
