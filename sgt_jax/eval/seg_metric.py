"""Segmentation by generation: generated colour map -> instance masks -> scores against ground truth.

SGT's model answers "give each instance its own colour" with an RGB image (the paper; song2yu/SGT `BAGEL/data/sam_190k.py`).
Scoring it needs two steps, both here and both host-side numpy (no jit: sizes vary per image):

1. ``colour_map_to_instances``: a generated image never holds exact palette colours (the VAE blurs
   borders and shifts hues slightly), so pixels are grouped by colour, robustly:
   a. quantise each channel into ``bin_size`` wide bins and histogram the bins;
   b. visit bins from most to least populated; a bin joins the nearest existing cluster if its centre is
      within ``merge_dist`` (Euclidean RGB distance, 0-255 scale), else it seeds a new cluster. A bin
      cannot seed if it holds less than ``min_area`` of the image, or if its colour lies within
      ``merge_dist`` of the segment between two existing (more populated) centres: blurring two flat
      neighbouring colours yields exactly such mixtures along their border;
   c. each pixel takes the cluster with the nearest centre if it is within ``assign_dist``; else it is
      left unassigned (label 0, treated like background);
   d. the cluster nearest ``background_color`` (black in our renderer) within ``merge_dist`` is
      background (label 0);
   e. optionally split each colour into connected components (``split_components``; off by default:
      one colour = one instance, which is what the task asks for, and occluded instances stay whole);
   f. instances smaller than ``min_area`` (fraction of the image) are dropped to 0.
2. ``match_instances``: IoU between every ground-truth and every predicted instance, then a one-to-one
   assignment maximising the total IoU (Hungarian, ``scipy.optimize.linear_sum_assignment``; scipy is
   a dependency of scikit-learn, so it is always present). Scores:
   - ``miou``: mean over ground-truth instances of the IoU of their matched prediction (0 when
     unmatched); colour-agnostic by construction (any permutation of colours scores the same);
   - ``precision``/``recall``/``f1`` at ``iou_threshold`` (matched pairs with IoU >= threshold);
   - ``fg_iou``: IoU of the union of instances (foreground vs background).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage, optimize


@dataclasses.dataclass(frozen=True)
class ClusterParams:
    """Colour-clustering settings (config.segment.cluster); see the module docstring."""

    bin_size: int = 16
    merge_dist: float = 60.0
    assign_dist: float = 90.0
    min_area: float = 0.002
    background_color: tuple[int, int, int] = (0, 0, 0)
    split_components: bool = False
    reject_blends: bool = True  # see step b; turn off for palettes with intentional mid-tones

    def validate(self) -> "ClusterParams":
        if not 1 <= self.bin_size <= 128:
            raise ValueError(f"cluster.bin_size must be in [1, 128], got {self.bin_size}")
        if self.merge_dist <= 0 or self.assign_dist <= 0:
            raise ValueError("cluster.merge_dist and cluster.assign_dist must be > 0")
        if not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"cluster.min_area is a fraction of the image in [0, 1), got {self.min_area}")
        if len(self.background_color) != 3:
            raise ValueError(f"cluster.background_color must be an RGB triple, got {self.background_color}")
        return self


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB values 0..255, got dtype {image.dtype}")
    return image


def _is_blend(colour: np.ndarray, centres: list[np.ndarray], tol: float) -> bool:
    """True if ``colour`` lies within ``tol`` of a segment between two (more populated) centres.

    Blurring two neighbouring flat colours produces their convex mixtures along the border; such a
    colour must not become an instance of its own."""
    for i in range(len(centres)):
        for j in range(i + 1, len(centres)):
            a, b = centres[i], centres[j]
            ab = b - a
            lam = np.clip(np.dot(colour - a, ab) / max(np.dot(ab, ab), 1e-9), 0.0, 1.0)
            if np.linalg.norm(a + lam * ab - colour) <= tol:
                return True
    return False


def colour_clusters(image: np.ndarray, params: ClusterParams = ClusterParams()) -> np.ndarray:
    """Cluster centres [K, 3] (float, 0..255) of a colour map, most populated first (steps a-b)."""
    image = _check_rgb(image)
    params.validate()
    pix = image.reshape(-1, 3).astype(np.int64)
    nbins = (256 + params.bin_size - 1) // params.bin_size
    q = pix // params.bin_size
    keys = (q[:, 0] * nbins + q[:, 1]) * nbins + q[:, 2]
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.zeros((len(uniq), 3), np.float64)
    np.add.at(sums, inverse.reshape(-1), pix)
    means = sums / counts[:, None]
    min_pixels = params.min_area * pix.shape[0]
    centres: list[np.ndarray] = []
    weights: list[float] = []
    for b in np.argsort(-counts, kind="stable"):
        if centres:
            d = np.linalg.norm(np.asarray(centres) - means[b], axis=1)
            j = int(np.argmin(d))
            if d[j] <= params.merge_dist:
                w = weights[j] + counts[b]
                centres[j] = (centres[j] * weights[j] + means[b] * counts[b]) / w
                weights[j] = w
                continue
        if counts[b] >= max(min_pixels, 1) and not (
                params.reject_blends and _is_blend(means[b], centres, params.merge_dist)):
            centres.append(means[b].copy())
            weights.append(float(counts[b]))
    if not centres:
        return np.zeros((0, 3), np.float64)
    order = np.argsort(-np.asarray(weights), kind="stable")
    return np.asarray(centres)[order]


def colour_map_to_instances(image: np.ndarray, params: ClusterParams = ClusterParams()) -> np.ndarray:
    """Instance label map int32 [H, W] of a generated colour map: 0 = background/unassigned, 1..K."""
    image = _check_rgb(image)
    h, w, _ = image.shape
    centres = colour_clusters(image, params)
    labels = np.zeros((h, w), np.int32)
    if len(centres) == 0:
        return labels
    # Distances on the distinct colours only (a 1024² map has far fewer colours than pixels).
    packed = image.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1], np.int64)
    colours, inverse = np.unique(packed, return_inverse=True)
    rgb = np.stack([colours // 65536, (colours // 256) % 256, colours % 256], axis=1).astype(np.float64)
    d = np.linalg.norm(rgb[:, None, :] - centres[None, :, :], axis=-1)
    nearest = np.argmin(d, axis=1)
    ok = d[np.arange(len(rgb)), nearest] <= params.assign_dist
    cluster_of = np.where(ok, nearest + 1, 0)[inverse.reshape(-1)].reshape(h, w)
    bg_d = np.linalg.norm(centres - np.asarray(params.background_color, np.float64), axis=1)
    bg = int(np.argmin(bg_d)) + 1 if bg_d.min() <= params.merge_dist else -1
    min_pixels = params.min_area * h * w
    next_id = 1
    for c in range(1, len(centres) + 1):
        if c == bg:
            continue
        region = cluster_of == c
        if params.split_components:
            comp, n = ndimage.label(region)
            parts = [comp == i for i in range(1, n + 1)]
        else:
            parts = [region]
        for part in parts:
            if part.sum() >= max(min_pixels, 1):
                labels[part] = next_id
                next_id += 1
    return labels


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU [M, K] between the ground-truth instances (ids > 0 of ``gt``) and predicted ones (of ``pred``).

    Returns (iou, gt_ids, pred_ids)."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} label maps differ in shape")
    gt_ids = np.unique(gt[gt > 0])
    pred_ids = np.unique(pred[pred > 0])
    if len(gt_ids) == 0 or len(pred_ids) == 0:
        return np.zeros((len(gt_ids), len(pred_ids))), gt_ids, pred_ids
    g = np.searchsorted(gt_ids, gt.reshape(-1))
    g = np.where(gt.reshape(-1) > 0, g, len(gt_ids))
    p = np.searchsorted(pred_ids, pred.reshape(-1))
    p = np.where(pred.reshape(-1) > 0, p, len(pred_ids))
    inter = np.zeros((len(gt_ids) + 1, len(pred_ids) + 1), np.int64)
    np.add.at(inter, (g, p), 1)
    inter = inter[:-1, :-1]
    area_g = np.bincount(g, minlength=len(gt_ids) + 1)[:-1]
    area_p = np.bincount(p, minlength=len(pred_ids) + 1)[:-1]
    union = area_g[:, None] + area_p[None, :] - inter
    return inter / np.maximum(union, 1), gt_ids, pred_ids


def match_instances(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Hungarian one-to-one matching of instances and the scores listed in the module docstring."""
    iou, gt_ids, pred_ids = iou_matrix(gt, pred)
    m, k = iou.shape
    best = np.zeros(m)
    pairs = []
    if m and k:
        rows, cols = optimize.linear_sum_assignment(-iou)
        for r, c in zip(rows, cols):
            best[r] = iou[r, c]
            pairs.append((int(gt_ids[r]), int(pred_ids[c]), float(iou[r, c])))
    tp = int(np.sum(best >= iou_threshold)) if m else 0
    precision = tp / k if k else float(m == 0)
    recall = tp / m if m else float(k == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    fg_g, fg_p = np.asarray(gt) > 0, np.asarray(pred) > 0
    fg_union = np.logical_or(fg_g, fg_p).sum()
    return {
        "miou": float(best.mean()) if m else float(k == 0),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "fg_iou": float(np.logical_and(fg_g, fg_p).sum() / fg_union) if fg_union else 1.0,
        "num_gt": int(m),
        "num_pred": int(k),
        "matches": pairs,
    }


def score_colour_map(image: np.ndarray, gt: np.ndarray, params: ClusterParams = ClusterParams(),
                     iou_threshold: float = 0.5) -> tuple[dict, np.ndarray]:
    """Cluster a generated colour map and score it against a ground-truth instance map."""
    pred = colour_map_to_instances(image, params)
    if pred.shape != np.asarray(gt).shape:
        raise ValueError(f"generated image {pred.shape} and ground truth {np.asarray(gt).shape} differ in "
                         "size; resize the ground truth with nearest-neighbour first")
    return match_instances(gt, pred, iou_threshold), pred


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """RGB uint8 visualisation: each instance of ``labels`` tinted with a random colour over ``image``."""
    image = _check_rgb(image)
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 256, size=(int(labels.max()) + 1, 3)).astype(np.float64)
    palette[0] = 0
    tint = palette[labels]
    out = np.where((labels > 0)[..., None], (1 - alpha) * image + alpha * tint, 0.5 * image)
    edges = labels != ndimage.grey_erosion(labels, size=3)
    out[edges] = 255
    return np.clip(out, 0, 255).astype(np.uint8)
