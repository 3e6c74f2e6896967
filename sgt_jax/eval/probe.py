"""Linear-probe separability of image features (the paper, Fig. 7).

The paper shows t-SNE plots of two confusable classes and claims better "linear separability" after
SGT, with no classifier in the released code. Our protocol (decided here, recorded in the output):
  * features: one vector per image, mean-pooled over its tokens (ViT output tokens before the connector,
    and/or the LLM hidden states of the image's tokens at chosen layers; see eval/features.py);
  * standardised with the training split's mean/std;
  * L2-regularised logistic regression (scikit-learn, lbfgs, ``C`` from config), multinomial for >2
    classes, on a stratified split with a fixed seed; the score is the held-out accuracy;
  * a 2-D projection for the picture only: PCA (deterministic, default) or t-SNE.
"""

from __future__ import annotations

import json
import os

import numpy as np

from sgt_jax.extras import require


def linear_probe(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.3, c: float = 1.0,
                 seed: int = 0) -> dict:
    """Held-out accuracy of an L2 logistic-regression probe on ``features`` [N, D] with ``labels`` [N]."""
    require("sklearn", "eval")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be [N, D] and labels [N]; got {x.shape} and {y.shape}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError("the probe needs at least two classes")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"analysis.probe_test_fraction must be in (0, 1), got {test_fraction}")
    if counts.min() < 2:
        raise ValueError(f"every class needs >= 2 examples for a stratified split; counts {dict(zip(classes, counts))}")
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    clf.fit(xtr, ytr)
    return {
        "test_accuracy": float(clf.score(xte, yte)),
        "train_accuracy": float(clf.score(xtr, ytr)),
        "chance": float(counts.max() / counts.sum()),
        "n_train": int(len(ytr)), "n_test": int(len(yte)), "dim": int(x.shape[1]),
        "classes": [str(c_) for c_ in classes], "C": c, "seed": seed,
    }


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, 2] projection of the (standardised) features, for plots only."""
    require("sklearn", "eval")
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(np.asarray(features, np.float64))
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, random_state=seed, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))
                    ).fit_transform(x)
    raise ValueError(f"analysis.probe_projection must be 'pca' or 'tsne', got {method!r}")


def plot_projection(points: np.ndarray, labels: np.ndarray, path: str, title: str = "") -> str:
    matplotlib = require("matplotlib", "eval")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for c in np.unique(labels):
        sel = labels == c
        ax.scatter(points[sel, 0], points[sel, 1], s=10, label=str(c), alpha=0.7)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def probe_report(feature_sets: dict[str, np.ndarray], labels: np.ndarray, out_dir: str,
                 test_fraction: float = 0.3, c: float = 1.0, seed: int = 0, projection: str = "pca") -> dict:
    """Probe each named feature set; write ``probe.json``, ``probe.csv`` and ``probe_<name>.png``."""
    os.makedirs(out_dir, exist_ok=True)
    labels = np.asarray(labels)
    results = {}
    for name, feats in feature_sets.items():
        r = linear_probe(feats, labels, test_fraction, c, seed)
        r["plot"] = plot_projection(project_2d(feats, projection, seed), labels,
                                    os.path.join(out_dir, f"probe_{name}.png"),
                                    f"{name}: held-out acc {r['test_accuracy']:.3f} ({projection})")
        results[name] = r
    with open(os.path.join(out_dir, "probe.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "probe.csv"), "w") as f:
        f.write("features,dim,n_train,n_test,train_accuracy,test_accuracy,chance\n")
        for name, r in results.items():
            f.write(f"{name},{r['dim']},{r['n_train']},{r['n_test']},{r['train_accuracy']:.6f},"
                    f"{r['test_accuracy']:.6f},{r['chance']:.6f}\n")
    return results
