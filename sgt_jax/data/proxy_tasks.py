"""Proxy tasks (song2yu/SGT `BAGEL/data/` (one dataset per proxy task)), selected by ``config.data.proxy_task``.

Every proxy uses the same sample shape and sequence plan as segmentation: a ViT input ``image`` and a VAE
``target`` of the same size. Only what goes in and what comes out changes:

| proxy_task       | task      | image (ViT input)          | target (VAE)                         |
|------------------|-----------|----------------------------|--------------------------------------|
| segmentation     | "seg"     | RGB                        | instance colour map (render.py rule) |
| reconstruction   | "recon"   | RGB                        | the same RGB                         |
| edge             | "edge"    | RGB                        | ``edge_map(RGB)``: white edges on black |
| inpainting       | "inpaint" | ``corrupt(RGB)``           | the clean RGB                        |

Edge map (the reference does not give its algorithm; this is ours): luma ``Y = 0.299 R + 0.587 G +
0.114 B`` in [0, 1]; 3x3 Sobel gradients with edge-replicated borders, divided by 4 so that a unit step
gives magnitude 1; a pixel is an edge (255) where ``sqrt(gx^2 + gy^2) >= EDGE_THRESHOLD`` (0.2), else 0.
Binary, so nearest-neighbour resizing keeps it exactly two-valued.

Inpainting corruption (our parameters, in the spirit of the reference's add_noise.py): per sample an
``intensity`` is drawn from (0.3, 0.5, 0.6, 0.8) and a fill colour from {white, black}; then
``1 + round(6 * intensity)`` random strokes (polylines of 2-4 points, width ``max(2, round(0.06 *
intensity * min(H, W)))``) and, with probability ``0.3 + 0.5 * intensity``, one rectangle whose sides are
uniform in [0.15, 0.15 + 0.4 * intensity] of the image sides, are painted in the fill colour. The random
stream is seeded by ``(seed, key)`` only, so a sample is corrupted the same way in every epoch and on every
host.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sgt_jax.data.render import key_seed

PROXY_TASKS = {"segmentation": "seg", "reconstruction": "recon", "edge": "edge", "inpainting": "inpaint"}
EDGE_THRESHOLD = 0.2
INPAINT_INTENSITIES = (0.3, 0.5, 0.6, 0.8)


def task_of(proxy_task: str) -> str:
    """The sample ``task`` string of a ``config.data.proxy_task`` value (clear error for unknown values)."""
    if proxy_task not in PROXY_TASKS:
        raise ValueError(f"config.data.proxy_task={proxy_task!r}; choose one of {tuple(PROXY_TASKS)}")
    return PROXY_TASKS[proxy_task]


def edge_map(rgb: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> uint8 [H, W, 3] binary edge map (255 on edges, 0 elsewhere); see module doc."""
    y = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32) / 255.0
    p = np.pad(y, 1, mode="edge")
    # Sobel: gx = [[-1,0,1],[-2,0,2],[-1,0,1]], gy its transpose; /4 normalises a unit step to 1.
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:] - p[:-2, :-2] - 2 * p[1:-1, :-2] - p[2:, :-2]) / 4.0
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:] - p[:-2, :-2] - 2 * p[:-2, 1:-1] - p[:-2, 2:]) / 4.0
    edges = np.sqrt(gx * gx + gy * gy) >= threshold
    return np.repeat((edges.astype(np.uint8) * 255)[..., None], 3, axis=2)


def corrupt(rgb: np.ndarray, key: str, seed: int = 0) -> np.ndarray:
    """Deterministic strokes/rectangle corruption of ``rgb`` for the inpainting proxy; see module doc."""
    h, w = rgb.shape[:2]
    rng = np.random.default_rng([seed, key_seed(key, "inpaint")])
    intensity = float(rng.choice(INPAINT_INTENSITIES))
    fill = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    width = max(2, int(round(0.06 * intensity * min(h, w))))
    for _ in range(1 + int(round(6 * intensity))):
        n_pts = int(rng.integers(2, 5))
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(n_pts)]
        draw.line(pts, fill=fill, width=width, joint="curve")
    if rng.random() < 0.3 + 0.5 * intensity:
        rw = w * rng.uniform(0.15, 0.15 + 0.4 * intensity)
        rh = h * rng.uniform(0.15, 0.15 + 0.4 * intensity)
        x0, y0 = rng.uniform(0, w - rw), rng.uniform(0, h - rh)
        draw.rectangle([x0, y0, x0 + rw, y0 + rh], fill=fill)
    return np.asarray(img, dtype=np.uint8)


def make_proxy_sample(image: np.ndarray, key: str, source: str, proxy_task: str, seed: int = 0) -> dict:
    """Builds the sample of a proxy task that needs only the RGB image (reconstruction, edge, inpainting)."""
    task = task_of(proxy_task)
    if task == "seg":
        raise ValueError("segmentation needs the instance mask; build its sample from the source's target")
    if task == "recon":
        return {"task": task, "key": key, "source": source, "image": image, "target": image.copy()}
    if task == "edge":
        return {"task": task, "key": key, "source": source, "image": image, "target": edge_map(image)}
    return {"task": task, "key": key, "source": source, "image": corrupt(image, key, seed), "target": image}
