"""Segmentation-by-generation scoring on synthetic colour maps with known answers."""

import numpy as np
import pytest
from scipy import ndimage

from sgt_jax.eval import seg_metric as sm

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25]], np.uint8)


def _scene(h=64, w=80):
    """Ground truth with 4 instances of different sizes on a background (0)."""
    gt = np.zeros((h, w), np.int32)
    gt[4:30, 5:35] = 1
    gt[35:60, 10:30] = 2
    yy, xx = np.mgrid[:h, :w]
    gt[(yy - 20) ** 2 + (xx - 60) ** 2 < 12 ** 2] = 3
    gt[45:58, 50:75] = 4
    return gt


def test_perfect_map_scores_one():
    gt = _scene()
    metrics, pred = sm.score_colour_map(PALETTE[gt], gt)
    assert metrics["miou"] == pytest.approx(1.0)
    assert metrics["f1"] == pytest.approx(1.0) and metrics["fg_iou"] == pytest.approx(1.0)
    assert metrics["num_pred"] == 4
    # predicted labels are a relabelling of the ground truth
    assert len(set(zip(gt.ravel(), pred.ravel()))) == 5


def test_swapped_colours_score_the_same():
    gt = _scene()
    swapped = PALETTE[[0, 3, 4, 1, 2]][gt]
    metrics, _ = sm.score_colour_map(swapped, gt)
    assert metrics["miou"] == pytest.approx(1.0) and metrics["num_pred"] == 4


def test_blurred_and_noisy_colours_are_robust():
    gt = _scene()
    img = PALETTE[gt].astype(np.float64)
    img = ndimage.gaussian_filter(img, sigma=(1.0, 1.0, 0))  # VAE-like border blur
    img += np.random.default_rng(0).normal(0, 6, img.shape)  # hue jitter
    img = np.clip(img, 0, 255).astype(np.uint8)
    metrics, _ = sm.score_colour_map(img, gt)
    assert metrics["num_pred"] == 4
    assert 0.85 < metrics["miou"] < 1.0  # borders get lost, the instances are found
    assert metrics["f1"] == pytest.approx(1.0)


def test_missing_instance_counts_zero():
    gt = _scene()
    shown = gt.copy()
    shown[shown == 3] = 0  # the model painted instance 3 as background
    metrics, _ = sm.score_colour_map(PALETTE[shown], gt)
    assert metrics["miou"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 4) and metrics["precision"] == pytest.approx(1.0)


def test_merged_instances_match_one_of_them():
    gt = _scene()
    merged = gt.copy()
    merged[merged == 2] = 1  # two instances painted with one colour
    metrics, _ = sm.score_colour_map(PALETTE[merged], gt)
    iou, _, _ = sm.iou_matrix(gt, merged)
    area1, area2 = (gt == 1).sum(), (gt == 2).sum()
    # instance 1 keeps the merged blob (the larger IoU), instance 2 is unmatched
    assert metrics["miou"] == pytest.approx((area1 / (area1 + area2) + 1 + 1 + 0) / 4)
    assert metrics["num_pred"] == 3


def test_tiny_specks_are_dropped_and_components_split():
    gt = _scene()
    img = PALETTE[gt].copy()
    img[0, 0] = [255, 0, 255]  # one stray pixel of an unseen colour
    labels = sm.colour_map_to_instances(img)
    assert labels[0, 0] == 0 and labels.max() == 4
    two_blobs = np.zeros((40, 40), np.int32)
    two_blobs[2:10, 2:10] = 1
    two_blobs[20:30, 20:30] = 1
    img2 = PALETTE[two_blobs]
    assert sm.colour_map_to_instances(img2).max() == 1
    split = sm.colour_map_to_instances(img2, sm.ClusterParams(split_components=True))
    assert split.max() == 2


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="RGB image"):
        sm.colour_map_to_instances(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        sm.colour_map_to_instances(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        sm.match_instances(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match="min_area"):
        sm.ClusterParams(min_area=2.0).validate()


def test_overlay_shape():
    gt = _scene()
    out = sm.overlay(PALETTE[gt], gt)
    assert out.shape == gt.shape + (3,) and out.dtype == np.uint8


def test_exact_ground_truth_from_rendered_map():
    from sgt_jax.eval.cli import colour_map_labels

    gt = _scene()
    labels = colour_map_labels(PALETTE[gt])
    assert labels.max() == 4 and (labels == 0).sum() == (gt == 0).sum()
    assert len(set(zip(gt.ravel(), labels.ravel()))) == 5  # a relabelling of the instances
