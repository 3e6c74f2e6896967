"""Attention allocation from the model's REAL attention probabilities (the paper, Fig. 8; song2yu/SGT `BAGEL/modeling/bagel/bagel.py`).

The released analysis recomputes attention by hand from layer outputs without norms, RoPE or masks. Here
the probabilities come from the dense attention itself (``return_probs``: after the q/k RMSNorms and RoPE,
under the true attention rule, GQA heads expanded), read while appending blocks to a context exactly as
inference does.

1. ``text_to_vision``: context = [ViT image block, question text block]. For every layer, the attention
   mass the question's text tokens (``<|im_start|>``, words, ``<|im_end|>``) put on the image's ViT tokens
   (markers excluded), averaged over heads and over those text tokens; reported per layer and averaged
   over the prompt set. (BAGEL's code used two query rows and the markers; we use all text tokens.)
2. ``word_attention``: text-to-image generation with the gen context = [prompt]. At the configured
   denoising steps the latent query block's attention onto the prompt's tokens is read, averaged over
   heads, latent query tokens, layers and steps. Each word's share of the mass on word tokens (markers
   excluded) is summed per lexicon category (eval/lexicon.py), so the four categories sum to 1 per
   prompt; the report averages prompts. The prompt is tokenised word by word (each word with its leading
   space), so every token belongs to exactly one word.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data.transforms import ImageTransform
from sgt_jax.eval.lexicon import CATEGORIES, Lexicon
from sgt_jax.extras import require
from sgt_jax.sampling import blocks, flow
from sgt_jax.sampling.engine import empty_context, round_up


def text_to_vision(inf, image: np.ndarray, question: str, vit_transform) -> np.ndarray:
    """Per-layer attention mass [L] from the question's tokens onto the image's ViT tokens."""
    vb = inf._vit_block(image, ImageTransform(*vit_transform))
    tb = inf._text_block(question)
    cap = round_up(vb["tokens"].shape[1] + tb["tokens"].shape[1], 64)
    ctx = inf.engine.append(empty_context(inf.model, cap), vb, rope_advance=1)
    _, probs = inf.engine.append(ctx, tb, rope_advance=tb["rope_advance"], return_probs=True)
    # probs [L, 1, Hq, T_text, S + T_text]; the ViT tokens sit in cache slots 1 .. n_vit (slot 0 and
    # n_vit+1 are the markers)
    n_vit = vb["tokens"].shape[1] - 2
    real = tb["n_real"]
    p = probs[:, 0, :, :real, 1:1 + n_vit].sum(-1)  # [L, Hq, real]
    return np.asarray(p.mean(axis=(1, 2)))


def word_token_ids(inf, prompt: str) -> tuple[list[int], list[int], list[str]]:
    """Prompt ids tokenised word by word, the word index of each token, and the words."""
    ids, owner, words = [], [], prompt.split()
    for i, w in enumerate(words):
        wi = inf.tok.encode((" " if i else "") + w, where="analysis prompt")
        ids += wi
        owner += [i] * len(wi)
    return ids, owner, words


def word_attention(inf, prompt: str, lexicon: Lexicon, *, height: int, width: int, num_timesteps: int,
                   timestep_shift: float, step_fractions, seed: int = 0) -> dict:
    """Category shares of the generated-image tokens' attention on the prompt's words (see module doc)."""
    ids, owner, words = word_token_ids(inf, prompt)
    tb = blocks.text_block(ids, inf.tokens, 16)
    h, w = height // inf.stride, width // inf.stride
    q = blocks.latent_query_block(h, w, inf.max_latent, inf.tokens)
    cap = round_up(tb["tokens"].shape[1], 64)
    gen = inf.engine.append(empty_context(inf.model, cap), tb, rope_advance=tb["rope_advance"])
    ts, dts = flow.timestep_schedule(num_timesteps, timestep_shift)
    read_at = sorted({min(len(ts) - 1, int(round(f * (len(ts) - 1)))) for f in step_fractions})
    x = jax.random.normal(jax.random.key(seed), (h * w, inf.model.patch_latent_dim), jnp.float32)
    per_token = np.zeros(len(ids))
    for i, (t, dt) in enumerate(zip(ts, dts)):
        if i in read_at:
            probs = inf.engine.query_probs(gen, q, x, float(t))  # [L, S + T_q], latent rows averaged
            # the prompt's word tokens are cache slots 1..len(ids) (slot 0 is <|im_start|>)
            per_token += np.asarray(probs[:, 1:1 + len(ids)].mean(axis=0))
        if i >= max(read_at):
            break
        v = inf.engine.velocity([gen], q, x, float(t))[0]  # conditional flow only (no CFG) for the path
        x = flow.euler_step(x, v, jnp.float32(dt))
    per_word = np.zeros(len(words))
    np.add.at(per_word, np.asarray(owner), per_token)
    total = per_word.sum()
    shares = {c: 0.0 for c in CATEGORIES}
    for wd, m in zip(words, per_word):
        shares[lexicon.category(wd)] += float(m / total) if total > 0 else 0.0
    return dict(prompt=prompt, shares=shares, words=[(wd, lexicon.category(wd), float(m / max(total, 1e-30)))
                                                     for wd, m in zip(words, per_word)], steps=read_at)


def _plot(path, xs, ys, xlabel, ylabel, title, kind="line", labels=None):
    matplotlib = require("matplotlib", "eval")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if kind == "line":
        ax.plot(xs, ys, marker="o")
    else:
        ax.bar(xs, ys)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attention_report(inf, vision_items, gen_prompts, out_dir: str, *, lexicon: Lexicon, vit_transform,
                     gen_settings: dict, progress: bool = True) -> dict:
    """Run both analyses; write CSV, JSON and PNG plots into ``out_dir``.

    ``vision_items``: list of (uint8 image, question); ``gen_prompts``: list of prompt strings."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    result = {}
    if vision_items:
        masses = np.stack([text_to_vision(inf, img, qst, vit_transform)
                           for img, qst in tqdm(vision_items, desc="text->vision", disable=not progress)])
        mean = masses.mean(0)
        with open(os.path.join(out_dir, "attn_text_to_vision.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["layer", "mean_mass", "std_mass", "n"])
            for layer, (m, s) in enumerate(zip(mean, masses.std(0))):
                wr.writerow([layer, f"{m:.6f}", f"{s:.6f}", len(masses)])
        _plot(os.path.join(out_dir, "attn_text_to_vision.png"), np.arange(len(mean)), mean, "layer",
              "attention mass on image tokens", "text -> vision attention")
        result["text_to_vision"] = dict(per_layer=[float(m) for m in mean], n=len(masses))
    if gen_prompts:
        rows = [word_attention(inf, p, lexicon, **gen_settings)
                for p in tqdm(gen_prompts, desc="word attention", disable=not progress)]
        avg = {c: float(np.mean([r["shares"][c] for r in rows])) for c in CATEGORIES}
        with open(os.path.join(out_dir, "attn_words.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["prompt"] + list(CATEGORIES))
            for r in rows:
                wr.writerow([r["prompt"]] + [f"{r['shares'][c]:.6f}" for c in CATEGORIES])
            wr.writerow(["MEAN"] + [f"{avg[c]:.6f}" for c in CATEGORIES])
        _plot(os.path.join(out_dir, "attn_words.png"), list(CATEGORIES), [avg[c] for c in CATEGORIES],
              "word category", "share of attention", "generated-image tokens -> prompt words", kind="bar")
        result["word_attention"] = dict(mean_shares=avg, per_prompt=rows)
    with open(os.path.join(out_dir, "attention.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
