"""``--mode segment`` and ``--mode evaluate`` (commands in docs/inference.md).

segment: image + instruction -> generated colour map -> instance masks -> scores vs ground truth.
  Items: ``--image`` files (no ground truth: maps and overlays only), else ``config.segment.source``:
  "synthetic" (held-out shapes-world scenes from ``segment.start_index``) or "data" (the records of
  ``config.data.sources.seg``, root overridden by ``--input``; ground truth = the rendered target's
  colours, exact for our renders of SA-1B / COCO panoptic / synthetic). Writes into
  ``<workdir>/segment/``: ``<id>_input.png``, ``<id>_pred.png`` (generated map, with settings),
  ``<id>_overlay.png``, ``results.jsonl``, ``results.csv`` and ``summary.json``.
evaluate: ``config.evaluate.kind`` = mcq (``--input`` benchmark file/folder) | geneval (``--input``
  evaluation_metadata.jsonl) | probe (``--input`` folder of class sub-folders or JSONL {image, label};
  none: shapes-world scenes whose largest shape is a circle vs a square, balanced) | attention (``--input`` JSONL of
  {image, question} and/or {prompt}; none: shapes-world questions and captions). Outputs under
  ``<workdir>/evaluate/<kind>/``.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import time

import numpy as np
from PIL import Image

from sgt_jax.data import synthetic, templates
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources import build_seg_source
from sgt_jax.data.transforms import resize
from sgt_jax.eval import geneval, mcq, presets, seg_metric
from sgt_jax.eval.attention_analysis import attention_report
from sgt_jax.eval.features import FeatureExtractor
from sgt_jax.eval.lexicon import load_lexicon
from sgt_jax.eval.probe import probe_report
from sgt_jax.sampling.cli import generate_one, load_image, make_inferencer, save_png
from sgt_jax.train.family import family

EVAL_KINDS = ("mcq", "geneval", "probe", "attention")
SEG_SOURCES = ("synthetic", "data")


def colour_map_labels(target: np.ndarray, background=(0, 0, 0)) -> np.ndarray:
    """Exact instance labels of a rendered colour map: each distinct non-background colour is one id."""
    packed = target.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1])
    bg = background[0] * 65536 + background[1] * 256 + background[2]
    colours, inv = np.unique(packed, return_inverse=True)
    ids = np.where(colours == bg, 0, np.cumsum(colours != bg))
    return ids[inv.reshape(-1)].reshape(target.shape[:2]).astype(np.int32)


def _segment_items(config, args):
    """(id, image uint8, ground-truth labels or None) for the run."""
    s = config.segment
    if args.images:
        return [(os.path.splitext(os.path.basename(p))[0], load_image(p), None) for p in args.images]
    if s.source not in SEG_SOURCES:
        raise ValueError(f"config.segment.source must be one of {SEG_SOURCES}, got {s.source!r}")
    n = int(s.num_images)
    if s.source == "synthetic":
        world = synthetic.WorldConfig.from_config(config.data.sources.synthetic)
        out = []
        for i in range(int(s.start_index), int(s.start_index) + n):
            scene = synthetic.make_scene(world, i)
            image, target, _ = synthetic.render_scene(scene)
            out.append((scene.key, image, colour_map_labels(target)))
        return out

    src = build_seg_source(config, root_override=args.input)
    out, skipped = [], 0
    for i in range(len(src)):
        if len(out) >= n:
            break
        try:
            rec = src.decode(src[i])
        except BadSample:
            skipped += 1
            continue
        out.append((rec["key"], rec["image"], colour_map_labels(rec["target"])))
    if skipped:
        print(f"segment: skipped {skipped} bad record(s)")
    return out


def segment_mode(config, args) -> dict:
    """--mode segment; returns the summary."""
    from tqdm import tqdm


    s = config.segment
    params = seg_metric.ClusterParams(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                                         for k, v in s.cluster.items()}).validate()
    items = _segment_items(config, args)
    inf = make_inferencer(config, args)
    instruction = args.prompt or s.instruction or templates.instruction_lists(config)["seg"][0]
    out_dir = os.path.join(args.workdir, "segment")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    t0 = time.time()
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        for k, (key, image, gt) in enumerate(tqdm(items, desc="segment")):
            seed = int(config.generate.seed) + k
            if inf.family == "omnigen2":  # SGT-OmniGen2: the image to the MLLM, the mask from the DiT
                pred, info = inf.generate_one(instruction, [image], seed, segment=True)
            else:
                pred, info = generate_one(inf, config, instruction, [image], seed,
                                          image_condition=str(s.image_condition), vit_transform=tuple(s.vit_transform))
            h, w = pred.shape[:2]
            shown = resize(image, w, h)
            save_png(shown, os.path.join(out_dir, f"{key}_input.png"), dict(key=key))
            save_png(pred, os.path.join(out_dir, f"{key}_pred.png"), dict(info, key=key))
            labels = seg_metric.colour_map_to_instances(pred, params)
            row = dict(key=key, height=h, width=w, seed=seed, num_pred=int(labels.max()))
            if gt is not None:
                gt_r = _resize_labels(gt, w, h)
                metrics = seg_metric.match_instances(gt_r, labels, float(s.iou_threshold))
                row.update({k_: v for k_, v in metrics.items() if k_ != "matches"}, matches=metrics["matches"])
            if s.save_overlays:
                save_png(seg_metric.overlay(shown, labels), os.path.join(out_dir, f"{key}_overlay.png"), dict(key=key))
            rows.append(row)
            f.write(json.dumps(row) + "\n")
    cols = ["key", "height", "width", "seed", "num_pred", "num_gt", "miou", "precision", "recall", "f1", "fg_iou"]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    scored = [r for r in rows if "miou" in r]
    summary = dict(n=len(rows), n_scored=len(scored), instruction=instruction, seconds=time.time() - t0,
                   cluster=dict(params.__dict__), iou_threshold=float(s.iou_threshold))
    for m in ("miou", "precision", "recall", "f1", "fg_iou"):
        if scored:
            summary[m] = float(np.mean([r[m] for r in scored]))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print("segment: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in summary.items() if k != "cluster") + f" -> {out_dir}")
    return summary


def _resize_labels(labels: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))


# ---------------------------------------------------------------------------------------------------
def _probe_set(config, args):
    """(images, labels) for the probe."""
    n = int(config.analysis.probe_num_images)
    if args.input and os.path.isdir(args.input):
        images, labels = [], []
        for cls in sorted(d for d in os.listdir(args.input) if os.path.isdir(os.path.join(args.input, d))):
            for p in sorted(glob.glob(os.path.join(args.input, cls, "*")))[: max(1, n // 2)]:
                images.append(load_image(p))
                labels.append(cls)
        return images, np.asarray(labels)
    if args.input:
        base = os.path.dirname(os.path.abspath(args.input))
        images, labels = [], []
        with open(args.input) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    p = r["image"] if os.path.isabs(r["image"]) else os.path.join(base, r["image"])
                    images.append(load_image(p))
                    labels.append(str(r["label"]))
        return images, np.asarray(labels)

    # Two balanced classes, like the paper's grand vs upright piano: scenes whose largest shape is a
    # circle vs a square (held-out scene indices from 200000).
    world = synthetic.WorldConfig.from_config(config.data.sources.synthetic)
    per_class = {"circle": [], "square": []}
    i = 200_000
    while min(len(v) for v in per_class.values()) < n // 2:
        scene = synthetic.make_scene(world, i)
        kind = max(scene.shapes, key=lambda s_: s_.r).kind
        if kind in per_class and len(per_class[kind]) < n // 2:
            per_class[kind].append(synthetic.render_scene(scene)[0])
        i += 1
    images = per_class["circle"] + per_class["square"]
    return images, np.asarray(["circle"] * (n // 2) + ["square"] * (n // 2))


def _attention_set(config, args):
    n = int(config.analysis.attn_num_prompts)
    vision, prompts = [], []
    if args.input:
        base = os.path.dirname(os.path.abspath(args.input))
        with open(args.input) as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                if r.get("image") and r.get("question"):
                    p = r["image"] if os.path.isabs(r["image"]) else os.path.join(base, r["image"])
                    vision.append((load_image(p), r["question"]))
                if r.get("prompt"):
                    prompts.append(r["prompt"])
        return vision[:n], prompts[:n]

    world = synthetic.WorldConfig.from_config(config.data.sources.synthetic)
    rng = np.random.default_rng(0)
    for i in range(n):
        scene = synthetic.make_scene(world, 300_000 + i)
        image = synthetic.render_scene(scene)[0]
        vision.append((image, synthetic.questions(scene, rng)[0][1]))
        prompts.append(synthetic.caption(scene))
    return vision, prompts


def evaluate_mode(config, args) -> dict:
    """--mode evaluate; returns the result of the chosen kind."""
    e = config.evaluate
    if e.preset and family(config) != "bagel":
        raise ValueError(f"config.evaluate.preset={e.preset!r} sets BAGEL's official GenEval settings; "
                         f"config.model.family={config.model.family!r} has no preset (set generate.omnigen2.*)")
    if e.preset:  # before anything reads the fields it sets (the model too: model.pos_table_dtype)
        print("\n".join(presets.apply_preset(config, str(e.preset), args.weights, args.input)))
    if e.kind not in EVAL_KINDS:
        raise ValueError(f"config.evaluate.kind must be one of {EVAL_KINDS}, got {e.kind!r}")
    if e.kind in ("probe", "attention") and family(config) != "bagel":
        raise ValueError(f"config.evaluate.kind={e.kind} reads BAGEL's ViT and LLM internals; for "
                         f"config.model.family={config.model.family!r} use mcq or geneval")
    if e.kind in ("mcq", "geneval") and not args.input:
        raise ValueError(f"--mode evaluate with evaluate.kind={e.kind} needs --input (the benchmark file)")
    out_dir = os.path.join(args.workdir, "evaluate", e.kind)
    limit = int(e.limit) or None
    u, g, a = config.understand, config.generate, config.analysis
    # Inputs are read before the weights load (minutes for 7B), so a wrong path fails at once.
    if e.kind == "mcq":
        questions = mcq.load_benchmark(args.input)[:limit]
        inf = make_inferencer(config, args)
        answer = lambda image, prompt: inf.understand(  # noqa: E731
            [image], prompt, max_new_tokens=int(e.mcq_max_new_tokens), vit_transform=tuple(u.vit_transform),
            cache_bucket=int(u.cache_bucket))
        result = mcq.run_mcq(questions, answer, out_dir, suffix=str(e.mcq_suffix))
        print(f"mcq: n={result['n']} overall={result['overall']:.4f} macro={result['macro']:.4f} "
              f"unparsed={result['unparsed']} -> {out_dir}")
        return result
    if e.kind == "geneval":
        geneval.read_metadata(args.input)
        inf = make_inferencer(config, args)
        result = geneval.run_geneval(args.input, out_dir, lambda p, s: generate_one(inf, config, p, [], s),
                                     n_per_prompt=int(e.geneval_n_per_prompt), seed=int(g.seed), limit=limit)
        print(f"geneval: {result}")
        return result
    if e.kind == "probe":
        from tqdm import tqdm

        images, labels = _probe_set(config, args)
        inf = make_inferencer(config, args)
        fx = FeatureExtractor(inf, tuple(u.vit_transform), tuple(a.probe_llm_layers))
        feats = {n_: [] for n_ in fx.names()}
        for img in tqdm(images, desc="features"):
            for n_, v in fx(img).items():
                feats[n_].append(v)
        result = probe_report({n_: np.stack(v) for n_, v in feats.items()}, labels, out_dir,
                              test_fraction=float(a.probe_test_fraction), c=float(a.probe_c),
                              projection=str(a.probe_projection))
        print("probe: " + ", ".join(f"{n_}={r['test_accuracy']:.3f}" for n_, r in result.items())
              + f" (chance {next(iter(result.values()))['chance']:.3f}) -> {out_dir}")
        return result
    vision, prompts = _attention_set(config, args)
    inf = make_inferencer(config, args)
    result = attention_report(
        inf, vision, prompts, out_dir, lexicon=load_lexicon(str(a.lexicon)), vit_transform=tuple(u.vit_transform),
        gen_settings=dict(height=int(a.attn_gen_size[0]), width=int(a.attn_gen_size[1]),
                          num_timesteps=int(g.num_timesteps),
                          timestep_shift=float(g.timestep_shift),
                          step_fractions=tuple(a.attn_gen_step_fractions), seed=int(g.seed)))
    if "word_attention" in result:
        print("attention: word shares " + ", ".join(f"{k}={v:.3f}" for k, v in
                                                    result["word_attention"]["mean_shares"].items()))
    print(f"attention -> {out_dir}")
    return result


# absl's app.run passes main's return value to sys.exit: the CLI entry points return None.
def run_segment(config, args) -> None:
    segment_mode(config, args)


def run_evaluate(config, args) -> None:
    evaluate_mode(config, args)
