"""Held-out evaluations of the small-scale SGT ablation (bench/toy_sgt.py).

* Perception MCQ (CV-Bench kinds on held-out synthetic scenes): each question comes with 2-4 choices
  written the way the training answers are ("Two.", "Yes.", "It is red."); the model's choice is the one
  with the highest log-likelihood (answer tokens + ``<|im_end|>``, teacher-forced after ``<|im_start|>``,
  exactly the training layout). A tiny model that never saw lettered-option prompts cannot be asked to
  answer with a letter, so likelihood ranking replaces CV-Bench's letter parsing; chance is 1/#choices.
* Generation (GenEval-style): a held-out scene's caption -> text-to-image -> sgt_jax.eval.shapes_detector
  -> present / count / colour / position / overall against the caption.
* Segmentation by generation: sgt_jax.eval.cli.segment_mode on held-out scenes (per-image mIoU).
* Linear probe and attention allocation: sgt_jax.eval.cli.evaluate_mode (docs/inference.md).
"""

from __future__ import annotations

import json
import os
import types

import jax
import numpy as np

from toy_sgt_lib import GEN_START, MCQ_KINDS, MCQ_START, world_of
from sgt_jax.data import synthetic
from sgt_jax.eval import shapes_detector

YES_NO = ("Yes.", "No.")


def _args(workdir: str, **kw):
    base = dict(workdir=workdir, step=None, weights="raw", images=[], prompt=None, input=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def mcq_items(config, n_per_kind: int, seed: int = 0) -> list[dict]:
    """``n_per_kind`` questions of each MCQ kind on held-out scenes (one question per scene)."""
    world = world_of(config)
    rng = np.random.default_rng([seed, 0xCB])
    items, counts, i = [], {k: 0 for k in MCQ_KINDS}, MCQ_START
    numbers = [f"{w.capitalize()}." for w in synthetic.NUMBER_WORDS[: world.max_shapes + 1]]
    colours = [f"It is {c}." for c in synthetic.COLOURS]
    while min(counts.values()) < n_per_kind:
        scene = synthetic.make_scene(world, i)
        qs = synthetic.questions(scene, rng, size_questions=True)
        by_kind = {}
        for kind, q, a in qs:
            by_kind.setdefault(kind, []).append((q, a))
        open_kinds = [k for k in MCQ_KINDS if counts[k] < n_per_kind and k in by_kind]
        if open_kinds:
            kind = open_kinds[int(rng.integers(len(open_kinds)))]
            q, a = by_kind[kind][int(rng.integers(len(by_kind[kind])))]
            if a in YES_NO:
                choices = list(YES_NO)
            else:
                pool = numbers if kind == "count" else colours
                others = [c for c in pool if c != a]
                choices = [a] + [others[j] for j in rng.choice(len(others), size=3, replace=False)]
                rng.shuffle(choices)
            items.append(dict(kind=kind, index=i, question=q, choices=choices, answer=choices.index(a)))
            counts[kind] += 1
        i += 1
    return items


def choice_logprobs(inf, image: np.ndarray, question: str, choices: list[str], vit_transform, cache_bucket: int
                    ) -> list[float]:
    """log p(choice + <|im_end|> | image, question, <|im_start|>) for each choice (teacher forcing)."""
    ids = [inf.tok.encode(c, where="choice") for c in choices]
    ctxs = inf.build_contexts([image, question], for_generation=False, vit_transform=vit_transform,
                              extra_tokens=max(len(x) for x in ids) + 2, cache_bucket=cache_bucket)
    key = jax.random.key(0)
    eos, bos = inf.tokens.eos, inf.tokens.bos
    logits0, _, ctx0 = inf.engine.decode_step(ctxs.gen, bos, key, greedy=True, temperature=1.0, top_p=1.0)
    out = []
    for seq in ids:
        logits, ctx, lp = logits0, ctx0, 0.0
        for j, tgt in enumerate(seq + [eos]):
            lp += float(jax.nn.log_softmax(logits.astype(np.float32))[tgt])
            if j < len(seq):
                logits, _, ctx = inf.engine.decode_step(ctx, seq[j], key, greedy=True, temperature=1.0, top_p=1.0)
        out.append(lp)
    return out


def eval_mcq(inf, config, items: list[dict]) -> list[dict]:
    world = world_of(config)
    u = config.understand
    rows = []
    for it in items:
        image = synthetic.render_scene(synthetic.make_scene(world, it["index"]))[0]
        lps = choice_logprobs(inf, image, it["question"], it["choices"], tuple(u.vit_transform),
                              int(u.cache_bucket))
        rows.append(dict(kind=it["kind"], index=it["index"], pred=int(np.argmax(lps)), answer=it["answer"],
                         correct=int(np.argmax(lps) == it["answer"]), n_choices=len(it["choices"])))
    return rows


def eval_geneval(inf, config, n: int, out_dir: str, save: int = 4) -> list[dict]:
    from sgt_jax.sampling.cli import generate_one, save_png

    world = world_of(config)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for k in range(n):
        scene = synthetic.make_scene(world, GEN_START + k)
        prompt = synthetic.caption(scene)
        image, info = generate_one(inf, config, prompt, [], int(config.generate.seed) + k)
        dets = shapes_detector.detect(image)
        score = shapes_detector.geneval_score(dets, shapes_detector.expected_of(scene))
        if k < save:
            save_png(image, os.path.join(out_dir, f"gen_{k}.png"), info)
        rows.append(dict(index=GEN_START + k, prompt=prompt, n_detected=len(dets), **score))
    return rows


def eval_segment(config, workdir: str) -> list[dict]:
    from sgt_jax.eval.cli import segment_mode

    segment_mode(config, _args(workdir))
    with open(os.path.join(workdir, "segment", "results.jsonl")) as f:
        return [{k: r[k] for k in ("key", "miou", "num_pred", "num_gt")} for r in map(json.loads, f) if "miou" in r]


def eval_probe_attention(config, workdir: str) -> dict:
    from sgt_jax.eval.cli import evaluate_mode

    out = {}
    for kind in ("probe", "attention"):
        c = config.copy_and_resolve_references()
        c.evaluate.kind = kind
        r = evaluate_mode(c, _args(workdir))
        if kind == "probe":
            out["probe"] = {k: dict(test_accuracy=v["test_accuracy"], chance=v["chance"]) for k, v in r.items()}
        else:
            out["attention"] = dict(text_to_vision=r.get("text_to_vision", {}).get("per_layer"),
                                    word_shares=r.get("word_attention", {}).get("mean_shares"))
    return out


def evaluate_run(config, workdir: str, hp: dict, *, analyses: bool) -> dict:
    """All held-out measurements of one trained run (its latest checkpoint, raw weights)."""
    from sgt_jax.sampling.cli import make_inferencer

    inf = make_inferencer(config, _args(workdir))
    res = dict(mcq=eval_mcq(inf, config, mcq_items(config, hp["mcq_per_kind"])),
               geneval=eval_geneval(inf, config, hp["geneval_prompts"], os.path.join(workdir, "geneval")))
    res["segment"] = eval_segment(config, workdir)
    if analyses:
        res.update(eval_probe_attention(config, workdir))
    return res
