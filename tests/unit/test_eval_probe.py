"""Linear probe on synthetic features with a known answer."""

import os

import numpy as np
import pytest

from sgt_jax.eval import probe


def _blobs(separable: bool, n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    x = rng.normal(size=(n, d))
    if separable:
        x[:, 0] += np.where(y == 1, 6.0, -6.0)  # a margin along one direction
    return x, y


def test_separable_features_probe_near_one():
    x, y = _blobs(True)
    r = probe.linear_probe(x, y, seed=1)
    assert r["test_accuracy"] >= 0.98 and r["n_test"] == 60


def test_random_labels_probe_near_chance():
    x, y = _blobs(False)
    r = probe.linear_probe(x, y, seed=1)
    assert r["chance"] == 0.5
    assert abs(r["test_accuracy"] - 0.5) < 0.15


def test_report_writes_files(tmp_path):
    xs, y = _blobs(True, n=60)
    xn, _ = _blobs(False, n=60)
    res = probe.probe_report({"vit": xs, "llm_l1": xn}, y, str(tmp_path), projection="pca")
    assert res["vit"]["test_accuracy"] > res["llm_l1"]["test_accuracy"]
    for f in ("probe.json", "probe.csv", "probe_vit.png", "probe_llm_l1.png"):
        assert os.path.getsize(tmp_path / f) > 0
    assert len(open(tmp_path / "probe.csv").read().splitlines()) == 3


def test_bad_inputs():
    with pytest.raises(ValueError, match="two classes"):
        probe.linear_probe(np.zeros((10, 2)), np.zeros(10))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        probe.linear_probe(np.zeros((10,)), np.zeros(10))
    with pytest.raises(ValueError, match="pca"):
        probe.project_2d(np.zeros((4, 2)), "umap")
