"""GenEval image dump: prompts from ``evaluation_metadata.jsonl`` -> GenEval's folder layout.

GenEval (Ghosh et al.) scores images with its own Mask2Former-based script; we only write the images it
reads. Layout (what its ``evaluate_images.py`` expects):

    <outdir>/<index:05d>/metadata.jsonl        the prompt's metadata line, unchanged (one JSON object)
    <outdir>/<index:05d>/samples/<k:04d>.png   N images per prompt (official protocol: 4; BAGEL's
                                               script used 1 with rewritten long prompts, §4.1)

Seeds are deterministic per (prompt index, sample k): ``seed + index * 1000 + k``; each image's settings
go to ``<outdir>/<index:05d>/samples/<k:04d>.json`` next to it. Existing complete prompt folders are
skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
from PIL import Image


def read_metadata(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"GenEval metadata file {path!r} does not exist")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {i + 1}: not JSON ({err.msg})") from None
                if not isinstance(row, dict) or "prompt" not in row:
                    raise ValueError(f"{path} line {i + 1}: no 'prompt' field")
                rows.append(row)
    return rows


def sample_seed(seed: int, index: int, k: int) -> int:
    return seed + index * 1000 + k


def run_geneval(metadata_path: str, outdir: str,
                generate_fn: Callable[[str, int], tuple[np.ndarray | Image.Image, dict]],
                n_per_prompt: int = 4, seed: int = 42, limit: int | None = None,
                progress: bool = True) -> dict:
    """Generate ``n_per_prompt`` images per prompt with ``generate_fn(prompt, seed) -> (image, info)``; the
    image is a uint8 [H, W, 3] array (what ``sampling.cli.generate_one`` returns) or a PIL image."""
    from tqdm import tqdm

    if n_per_prompt < 1:
        raise ValueError(f"evaluate.geneval_n_per_prompt must be >= 1, got {n_per_prompt}")
    rows = read_metadata(metadata_path)
    if limit:
        rows = rows[:limit]
    written = skipped = 0
    for index, row in enumerate(tqdm(rows, desc="geneval", disable=not progress)):
        folder = os.path.join(outdir, f"{index:05d}")
        samples = os.path.join(folder, "samples")
        done = [os.path.exists(os.path.join(samples, f"{k:04d}.png")) for k in range(n_per_prompt)]
        if all(done):
            skipped += 1
            continue
        os.makedirs(samples, exist_ok=True)
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.write(json.dumps(row) + "\n")
        for k in range(n_per_prompt):
            if done[k]:
                continue
            s = sample_seed(seed, index, k)
            image, info = generate_fn(row["prompt"], s)
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            image.save(os.path.join(samples, f"{k:04d}.png"))
            with open(os.path.join(samples, f"{k:04d}.json"), "w") as f:
                json.dump(dict(info, prompt=row["prompt"], seed=s), f, indent=1, default=str)
            written += 1
    return {"prompts": len(rows), "images_written": written, "prompts_skipped": skipped, "outdir": outdir}
