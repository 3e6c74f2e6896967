"""Decode throughput of one data worker for a SAM-sized segmentation sample.

    .venv/bin/python bench/data_decode_bench.py [--n 10] [--tmp /tmp/sgt_decode_bench]

Generates (under --tmp, once) a 2250x1500 photo-like JPEG (quality 90) and its instance colour-map PNG with
~80 instances, laid out as SAM-SGT (``sam_selection/`` + ``sam_mask/`` + a list file), and the same image as
a raw SA-1B pair (JPEG + JSON of COCO RLEs). Then times, in this single process and thread (= one Grain
worker):
  sam_sgt decode             read + JPEG decode + PNG decode + checks (SamSgtFolderSource.decode)
  sam_sgt decode+transforms  + BAGEL transforms of the 7b config: ViT view (longest side 224, bicubic),
                             VAE target (1024x688, nearest) normalised, ViT patchify (D2's transforms.py)
  sa1b decode (render RLEs)  read + JPEG decode + RLE decode + rendering the colour map
  prepared decode            the same SAM sample read back from an ArrayRecord shard
Prints a markdown table (median of --n timed runs after one warm-up): samples/s from the process CPU time
(one worker with a core to itself), and CPU and wall ms per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgt_jax.data import render, sources  # noqa: E402
from sgt_jax.data.prepare import prepare_family  # noqa: E402

H, W, N_INST = 1500, 2250, 80


def _make_data(tmp: str) -> None:
    if os.path.exists(os.path.join(tmp, "done")):
        return
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 97 + c) * np.cos(yy / 61 - c) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)  # sensor-like noise: makes the JPEG as large as a real photo
    img = np.clip(img, 0, 255).astype(np.uint8)
    masks = []
    for _ in range(N_INST):
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        ry, rx = rng.integers(20, 400), rng.integers(20, 400)
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8))
    target = render.render_instances([m.astype(bool) for m in masks], "sa_bench", H, W)
    os.makedirs(os.path.join(tmp, "sam", "sam_selection"), exist_ok=True)
    os.makedirs(os.path.join(tmp, "sam", "sam_mask"), exist_ok=True)
    os.makedirs(os.path.join(tmp, "sa1b"), exist_ok=True)
    Image.fromarray(img).save(os.path.join(tmp, "sam", "sam_selection", "sa_bench.jpg"), quality=90)
    Image.fromarray(target).save(os.path.join(tmp, "sam", "sam_mask", "sa_bench.png"))
    with open(os.path.join(tmp, "sam", "list.txt"), "w") as f:
        f.write("sam_selection/sa_bench.jpg\n")
    Image.fromarray(img).save(os.path.join(tmp, "sa1b", "sa_bench.jpg"), quality=90)
    anns = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    with open(os.path.join(tmp, "sa1b", "sa_bench.json"), "w") as f:
        json.dump({"image": {"height": H, "width": W}, "annotations": anns}, f)
    open(os.path.join(tmp, "done"), "w").close()


def _rate(fn, n: int) -> tuple[float, float, float]:
    """(samples/s by CPU time, wall ms, CPU ms) medians. CPU time is what one worker with a core of its own
    would see; wall time also counts waiting for a core on a shared machine."""
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return 1.0 / cpu, wall * 1000, cpu * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--tmp", default="/tmp/sgt_decode_bench")
    a = ap.parse_args()
    _make_data(a.tmp)
    sam = sources.SamSgtFolderSource(os.path.join(a.tmp, "sam"), "list.txt")
    sa1b = sources.Sa1bSource(os.path.join(a.tmp, "sa1b"))
    prep_dir = os.path.join(a.tmp, "prepared")
    if not os.path.exists(os.path.join(prep_dir, "seg-00000-of-00001.array_record")):
        prepare_family(sam, prep_dir, "seg", "segmentation", 16, progress=False)
    prep = sources.PreparedSource(prep_dir, "seg")
    rows = [("sam_sgt decode", lambda: sam.decode(sam[0]))]
    try:
        from sgt_jax.configs_util import load_config
        from sgt_jax.data.transforms import Transforms

        tf = Transforms.from_config(load_config("configs/bagel_sgt.py:7b"))

        def full():
            s = sam.decode(sam[0])
            vit = tf.sgt_vit(s["image"])
            tf.vae(s["target"], nearest=True)
            tf_p = tf.patch_size
            from sgt_jax.data.transforms import patchify

            patchify(vit, tf_p, tf.max_patches_per_side)

        rows.append(("sam_sgt decode+transforms", full))
    except ImportError as err:
        print(f"(D2's transforms not available: {err}; timing decode only)")
    rows += [("sa1b decode (render RLEs)", lambda: sa1b.decode(sa1b[0])),
             ("prepared decode", lambda: prep.decode(prep[0]))]
    jpg = os.path.getsize(os.path.join(a.tmp, "sam", "sam_selection", "sa_bench.jpg"))
    png = os.path.getsize(os.path.join(a.tmp, "sam", "sam_mask", "sa_bench.png"))
    print(f"sample: {W}x{H} JPEG {jpg / 1e6:.2f} MB + mask PNG {png / 1e6:.2f} MB, {N_INST} instances; "
          f"median of {a.n} runs, 1 process, 1 thread\n")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| stage | samples/s per worker (CPU time) | CPU ms/sample | wall ms/sample |\n|---|---|---|---|")
    for name, fn in rows:
        r, wall, cpu = _rate(fn, a.n)
        print(f"| {name} | {r:.2f} | {cpu:.0f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
