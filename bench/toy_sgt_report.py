"""The markdown report and PNG plots of bench/toy_sgt.py."""

from __future__ import annotations

import os
import shutil

import numpy as np

from sgt_jax.eval.bootstrap import diff_ci, mean_ci

KINDS = ("count", "position", "size", "colour", "exists")
GEN_CHECKS = ("present", "count", "colour", "position", "overall")
# BAGEL CV-Bench in the SGT paper (overall accuracy, %)
PAPER = {"base": 73.21, "sft": 74.61, "edge_2to1": 74.56, "recon_2to1": 75.23, "sgt_2to1": 79.23}


def _matrix(evals: dict, arm: str, seeds: int, section: str, key: str, kind: str | None = None):
    rows = []
    for s in range(seeds):
        name = arm if arm == "base" else f"{arm}_s{s}"
        if name not in evals:
            continue
        items = [r for r in evals[name][section] if kind is None or r.get("kind") == kind]
        rows.append([float(r[key]) for r in items])
        if arm == "base":
            break
    if not rows or not rows[0]:
        return None
    return np.asarray(rows)


def _fmt(ci) -> str:
    if ci is None:
        return "n/a"
    return f"{100 * ci['mean']:.1f} [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}]"


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(out_dir: str, arms: list[str], mcq: dict, ratio_pts: list, curves: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = np.arange(len(arms))
    m = [100 * mcq[a]["mean"] for a in arms]
    err = [[100 * (mcq[a]["mean"] - mcq[a]["lo"]) for a in arms], [100 * (mcq[a]["hi"] - mcq[a]["mean"]) for a in arms]]
    ax.bar(xs, m, yerr=err, capsize=4, color="#5b8def")
    ax.set_xticks(xs, arms, rotation=20)
    ax.set_ylabel("MCQ accuracy (%)")
    ax.set_title("held-out perception MCQ, 95% bootstrap CI")
    paths.append(_save(plt, fig, os.path.join(out_dir, "toy_sgt_accuracy.png")))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    r = [p[0] for p in ratio_pts]
    ax.errorbar(r, [100 * p[1]["mean"] for p in ratio_pts],
                yerr=[[100 * (p[1]["mean"] - p[1]["lo"]) for p in ratio_pts],
                      [100 * (p[1]["hi"] - p[1]["mean"]) for p in ratio_pts]], marker="o", capsize=4)
    ax.set_xticks(r, [f"{x}:1" if x else "SFT" for x in r])
    ax.set_xlabel("seg : VQA samples per step")
    ax.set_ylabel("MCQ accuracy (%)")
    ax.set_title("SGT ratio study")
    paths.append(_save(plt, fig, os.path.join(out_dir, "toy_sgt_ratio.png")))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, rows in curves.items():
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("ce", "mse")):
            ax.plot(steps, [r[key] for r in rows], label=name, lw=1)
    for ax, key in zip(axes, ("CE (VQA answers)", "MSE (flow matching)")):
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    paths.append(_save(plt, fig, os.path.join(out_dir, "toy_sgt_curves.png")))
    return paths


def write_report(path: str, *, workdir: str, hp: dict, quick: bool, vae: dict, runs: dict, evals: dict, arms: dict,
                 stage_seconds: dict, wall_this_call: float, command: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    seeds = int(hp["seeds"])
    names = ["base"] + list(arms)
    mcq = {a: mean_ci(m) for a in names if (m := _matrix(evals, a, seeds, "mcq", "correct")) is not None}
    L = ["# Small-scale SGT ablation on the synthetic shapes world (`bench/toy_sgt.py`)", ""]
    if quick:
        L += ["**QUICK MODE: a smoke test of the pipeline (every stage at toy length). These numbers are NOT "
              "results.**", ""]
    total = sum(w for w, _ in stage_seconds.values())
    cpu = sum(c for _, c in stage_seconds.values())
    L += [f"Command: `{command}`  ", f"Workdir: `{workdir}`  ",
          f"Wall time of all stages: {total:.0f} s ({total / 60:.1f} min; this call {wall_this_call:.0f} s); "
          f"CPU time {cpu:.0f} s  ",
          f"Seeds per arm: {seeds}; MCQ questions: {hp['eval']['mcq_per_kind']} per kind x {len(KINDS)} kinds", "",
          "How to read these tables, and what at this scale could explain a difference from the paper: "
          "docs/toy_study.md (\"What the recorded run shows\").", ""]
    grid = os.path.join(workdir, "vae", "reconstructions.png")
    if os.path.exists(grid):  # next to the report, so that the report's link works where it is read
        shutil.copyfile(grid, os.path.join(out_dir, "toy_sgt_vae_reconstructions.png"))
    L += ["## VAE", "", "| PSNR random VAE (dB) | PSNR trained (dB) | latent mean | latent std |", "|---|---|---|---|",
          f"| {vae['psnr_random']:.2f} | {vae['psnr']:.2f} | {vae['latent_mean']:.3f} | {vae['latent_std']:.3f} |", "",
          "Reconstructions (top: held-out scenes, bottom: decoded): "
          + ("![VAE reconstructions](toy_sgt_vae_reconstructions.png)" if os.path.exists(grid) else "not found"), ""]
    L += ["## Perception MCQ (held-out scenes, likelihood ranking of the choices; 95 % bootstrap CI over "
          "questions and seeds)", "", "| arm | overall | " + " | ".join(KINDS) + " | vs SFT (diff, CI) | paper CV-Bench |",
          "|---|---|" + "---|" * len(KINDS) + "---|---|"]
    sft_m = _matrix(evals, "sft", seeds, "mcq", "correct")
    for a in names:
        if a not in mcq:
            continue
        per = [_fmt(mean_ci(m)) if (m := _matrix(evals, a, seeds, "mcq", "correct", k)) is not None else "n/a"
               for k in KINDS]
        d = ""
        if a not in ("sft", "base") and sft_m is not None:
            dd = diff_ci(_matrix(evals, a, seeds, "mcq", "correct"), sft_m)
            d = f"{100 * dd['diff']:+.1f} [{100 * dd['lo']:+.1f}, {100 * dd['hi']:+.1f}]"
        L.append(f"| {a} | {_fmt(mcq[a])} | " + " | ".join(per) + f" | {d} | {PAPER.get(a, '')} |")
    L += ["", "## Generation (GenEval-style, shapes detector on the generated image)", "",
          "| arm | " + " | ".join(GEN_CHECKS) + " |", "|---|" + "---|" * len(GEN_CHECKS)]
    for a in names:
        cells = [_fmt(mean_ci(m)) if (m := _matrix(evals, a, seeds, "geneval", k)) is not None else "n/a"
                 for k in GEN_CHECKS]
        L.append(f"| {a} | " + " | ".join(cells) + " |")
    L += ["", "## Segmentation by generation (held-out scenes, mIoU %)", "", "| arm | mIoU |", "|---|---|"]
    for a in names:
        m = _matrix(evals, a, seeds, "segment", "miou")
        L.append(f"| {a} | {_fmt(mean_ci(m)) if m is not None else 'n/a'} |")
    L += ["", "## Linear probe and attention allocation (seed 0)", "",
          "| run | probe accuracy per feature set (chance) | text->vision attention mass per layer | word shares |",
          "|---|---|---|---|"]
    for n, e in evals.items():
        if "probe" not in e:
            continue
        pr = ", ".join(f"{k} {v['test_accuracy']:.2f} ({v['chance']:.2f})" for k, v in e["probe"].items())
        at = e["attention"]
        tv = ", ".join(f"{x:.3f}" for x in at["text_to_vision"] or [])
        ws = ", ".join(f"{k} {v:.2f}" for k, v in (at["word_shares"] or {}).items())
        L.append(f"| {n} | {pr} | {tv} | {ws} |")
    L += _answer_bias_section(evals, seeds, names)
    L += _ordering_section(evals, seeds, mcq, sft_m)
    ratio_pts = [(r, mcq[a]) for r, a in ((0, "sft"), (1, "sgt_1to1"), (2, "sgt_2to1"), (4, "sgt_4to1")) if a in mcq]
    curves = {"base": runs.get("base", {}).get("metrics", [])}
    curves.update({a: runs.get(f"{a}_s0", {}).get("metrics", []) for a in arms})
    plot_arms = [a for a in names if a in mcq]
    if plot_arms:
        plots = _plots(out_dir, plot_arms, mcq, ratio_pts, curves)
        L += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    L += ["", "## Stage times", "", "| stage | wall s | CPU s |", "|---|---|---|"]
    L += [f"| {k} | {w:.1f} | {c:.1f} |" for k, (w, c) in stage_seconds.items()]
    L += ["", "## Fixed hyper-parameters (set before any run; identical for every arm)", "", "```",
          _hp_text(hp), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def answer_bias(evals: dict, arm: str, seeds: int, kind: str) -> dict | None:
    """How much of an arm's MCQ answers of one kind is a single choice: the share of the most frequent
    predicted choice index, pooled over seeds, against the accuracy that always answering the most frequent
    true choice would get. A share near 1 means the model answers one option whatever the image, and its
    accuracy on that kind is the label frequency, not perception."""
    preds, answers = [], []
    for s in range(seeds):
        name = arm if arm == "base" else f"{arm}_s{s}"
        if name in evals:
            items = [r for r in evals[name]["mcq"] if r.get("kind") == kind and "pred" in r]
            preds += [int(r["pred"]) for r in items]
            answers += [int(r["answer"]) for r in items]
        if arm == "base":
            break
    if not preds:
        return None
    top = np.bincount(preds).max() / len(preds)
    return {"top_share": float(top), "majority_accuracy": float(np.bincount(answers).max() / len(answers))}


def _answer_bias_section(evals: dict, seeds: int, names: list[str]) -> list[str]:
    rows = []
    for a in names:
        cells = [answer_bias(evals, a, seeds, k) for k in KINDS]
        if any(c is not None for c in cells):
            rows.append(f"| {a} | " + " | ".join("n/a" if c is None else f"{100 * c['top_share']:.0f} %"
                                                  for c in cells) + " |")
    if not rows:
        return []
    maj = [answer_bias(evals, "base", 1, k) for k in KINDS]
    return (["", "## Answer bias (share of the most frequent predicted choice, pooled over seeds)", "",
             "100 % = the same option for every question of that kind, whatever the image: accuracy there is "
             "the label frequency (always answering the most frequent true choice: "
             + ", ".join(f"{k} {100 * m['majority_accuracy']:.0f} %" for k, m in zip(KINDS, maj) if m is not None)
             + "), not perception.", "", "| arm | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
            + rows)


def _ordering_section(evals: dict, seeds: int, mcq: dict, sft_m) -> list[str]:
    """The paper's claims about the arms, each checked against this study's MCQ numbers, in words that
    follow from the intervals (a difference whose 95 % CI contains 0 is reported as no difference)."""
    def vs(a: str, b: str) -> str | None:
        ma, mb = _matrix(evals, a, seeds, "mcq", "correct"), _matrix(evals, b, seeds, "mcq", "correct")
        if ma is None or mb is None:
            return None
        d = diff_ci(ma, mb)
        word = "higher than" if d["lo"] > 0 else "lower than" if d["hi"] < 0 else "not distinguishable from"
        return (f"{a} is {word} {b}: {100 * d['diff']:+.1f} points, 95 % CI [{100 * d['lo']:+.1f}, "
                f"{100 * d['hi']:+.1f}]")

    claims = [("SGT 2:1 above SFT only (paper: 79.23 vs 74.61)", "sgt_2to1", "sft"),
              ("SGT 2:1 above SFT + reconstruction (paper: 79.23 vs 75.23)", "sgt_2to1", "recon_2to1"),
              ("SGT 2:1 above SFT + edge (paper: 79.23 vs 74.56)", "sgt_2to1", "edge_2to1"),
              ("2:1 the best ratio: above 1:1", "sgt_2to1", "sgt_1to1"),
              ("2:1 the best ratio: above 4:1", "sgt_2to1", "sgt_4to1")]
    rows = [(c, r) for c, a, b in claims if (r := vs(a, b)) is not None]
    if not rows:
        return []
    order = sorted((a for a in mcq if a != "base"), key=lambda a: -mcq[a]["mean"])
    out = ["", "## The paper's ordering, checked here (MCQ overall; paired bootstrap over questions, seeds "
           "redrawn per arm)", "", "| the paper's claim | here |", "|---|---|"]
    out += [f"| {c} | {r} |" for c, r in rows]
    out += ["", "Arms by mean MCQ accuracy here: " + " > ".join(f"{a} ({100 * mcq[a]['mean']:.1f})" for a in order)
            + ". Paper (CV-Bench): sgt_2to1 (79.23) > recon_2to1 (75.23) > sft (74.61) > edge_2to1 (74.56)."]
    return out


def _hp_text(hp: dict) -> str:
    import json

    return json.dumps(hp, indent=1, sort_keys=True)
