"""``--mode understand`` and ``--mode generate`` (see docs/inference.md for the commands).

understand: image(s) + question -> answer. One request from ``--prompt`` (+ ``--image`` ...), or a JSONL
  file ``--input`` with one request per line: ``{"id": ..., "prompt": "...", "images": ["a.png", ...]}``
  (``"image"`` for one, paths relative to the JSONL's folder). Answers go to
  ``<workdir>/understand/answers.jsonl`` with the settings used.
generate: text -> image, or image(s) + instruction -> image (editing; segmentation by generation).
  Same request forms (``--input`` lines may also set ``seed``, ``height``, ``width``). Images go to
  ``<workdir>/generate/<request>_<k>.png`` with every setting + seed in a PNG text chunk and a JSON
  sidecar. With input images the ``generate.edit`` CFG settings apply, else ``generate.t2i``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from PIL import Image, PngImagePlugin

from sgt_jax.data.tokenizer import get_tokenizer
from sgt_jax.sampling import flow
from sgt_jax.sampling.inference import Inferencer
from sgt_jax.sampling.loading import inference_config, load_model
from sgt_jax.train.family import family


def load_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] as displayed (the data pipeline's decode: EXIF orientation applied, transparency
    composited on white as BAGEL's ``pil_img2rgb``). ValueError naming the file if it is not an image."""
    from sgt_jax.data.records import BadSample
    from sgt_jax.data.sources.common import decode_rgb, read_bytes

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist" if not os.path.exists(path) else
                                f"image {path!r} is not a file")
    try:
        return decode_rgb(read_bytes(path), "image", path)
    except BadSample as err:
        raise ValueError(f"image {path}: not a readable image ({err.reason})") from None


def check_images(paths) -> None:
    """Every input image exists and its header is an image's: checked before any weight is loaded."""
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"image {p!r} does not exist" if not os.path.exists(p) else
                                    f"image {p!r} is not a file")
        try:
            with Image.open(p):
                pass
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"image {p}: not an image ({type(err).__name__})") from None


def read_requests(args, need_prompt: bool = True) -> list[dict]:
    """Requests from ``--input`` (JSONL) or from ``--prompt``/``--image``; each {id, prompt, images}."""
    if args.input:
        if not os.path.exists(args.input):
            raise FileNotFoundError(f"--input {args.input!r} does not exist")
        base = os.path.dirname(os.path.abspath(args.input))
        out = []
        from sgt_jax.data.sources.common import read_text

        for i, line in enumerate(read_text(args.input, "--input").splitlines()):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{args.input} line {i + 1}: not JSON ({err.msg})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{args.input} line {i + 1}: not a JSON object")
            prompt = r.get("prompt", r.get("question"))
            if need_prompt and not prompt:
                raise ValueError(f"{args.input} line {i + 1}: no 'prompt' (or 'question') field")
            imgs = r.get("images", [r["image"]] if r.get("image") else [])
            imgs = [p if os.path.isabs(p) else os.path.join(base, p) for p in imgs]
            check_images(imgs)
            out.append(dict(r, id=r.get("id", len(out)), prompt=prompt, images=imgs))
        return out
    if need_prompt and not args.prompt:
        raise ValueError("give --prompt (and --image for image inputs) or --input with a JSONL file of requests")
    check_images(args.images)
    return [dict(id=0, prompt=args.prompt, images=list(args.images))]


def make_inferencer(config, args):
    """Load weights (sgt_jax/sampling/loading.py) and the tokenizer; print where they came from. An
    OmniGen2 config (``config.model.family``) gives an ``OmniGen2Inferencer`` with the same entry points."""
    t0 = time.time()
    if family(config) == "omnigen2":
        from sgt_jax.sampling.omnigen2_inference import OmniGen2Inferencer, tokenizer_for

        config = inference_config(config, args.workdir)
        model, source = load_model(config, args.workdir, args.step, args.weights)
        print(f"loaded weights from {source} in {time.time() - t0:.1f}s")
        return OmniGen2Inferencer(model, tokenizer_for(config, args.workdir), config)
    model, source = load_model(config, args.workdir, args.step, args.weights)
    print(f"loaded weights from {source} in {time.time() - t0:.1f}s")
    return Inferencer(model, get_tokenizer(config), config)


def cfg_settings(section) -> flow.CfgSettings:
    return flow.CfgSettings(float(section.cfg_text_scale), float(section.cfg_img_scale),
                            tuple(float(x) for x in section.cfg_interval), str(section.cfg_renorm_type),
                            float(section.cfg_renorm_min)).validate()


def save_png(image: np.ndarray, path: str, info: dict) -> str:
    """PNG with ``info`` as JSON in a text chunk ("sgt_jax") and in a ``.json`` sidecar."""
    meta = PngImagePlugin.PngInfo()
    text = json.dumps(info, default=str, sort_keys=True)
    meta.add_text("sgt_jax", text)
    Image.fromarray(image).save(path, pnginfo=meta)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        f.write(text + "\n")
    return path


def understand_mode(config, args) -> str:
    """--mode understand; returns the answers file."""
    from tqdm import tqdm

    u = config.understand
    requests = read_requests(args)
    inf = make_inferencer(config, args)
    out_dir = os.path.join(args.workdir, "understand")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "answers.jsonl")
    settings = dict(max_new_tokens=int(u.max_new_tokens), do_sample=bool(u.do_sample),
                    temperature=float(u.temperature), top_p=float(u.top_p), seed=int(u.seed), think=bool(u.think))
    t0 = time.time()
    with open(path, "w") as f:
        for r in tqdm(requests, desc="understand"):
            images = [load_image(p) for p in r["images"]]
            answer = inf.understand(images, r["prompt"], vit_transform=tuple(u.vit_transform),
                                    cache_bucket=int(u.cache_bucket), **settings)
            rec = dict(id=r["id"], prompt=r["prompt"], images=r["images"], answer=answer, settings=settings)
            f.write(json.dumps(rec, default=str) + "\n")
            if len(requests) == 1:
                print(f"Q: {r['prompt']}\nA: {answer}")
    print(f"understand: {len(requests)} request(s) in {time.time() - t0:.1f}s -> {path}")
    return path


def generate_one(inf, config, prompt: str, images: list[np.ndarray], seed: int, *, height=None, width=None,
                 image_condition=None, vit_transform=None) -> tuple[np.ndarray, dict]:
    """One image for a prompt (+ images), with the settings of ``config.generate``; returns (image, info)."""
    import jax

    if inf.family == "omnigen2":
        return inf.generate_one(prompt, images, seed, height=height, width=width)
    g = config.generate
    edit = bool(images)
    cfg = cfg_settings(g.edit if edit else g.t2i)
    cond = image_condition or str(g.image_condition)
    think_tokens = int(g.max_think_tokens) if g.think else 0
    ctxs = inf.build_contexts(list(images) + [prompt], for_generation=True, image_condition=cond,
                              vit_transform=vit_transform, extra_tokens=think_tokens + 32,
                              cache_bucket=int(g.cache_bucket), think=bool(g.think), key=jax.random.key(seed),
                              vae_sample=bool(g.vae_sample))
    thought = None
    if g.think:
        ctxs, thought = inf.think(ctxs, max_new_tokens=think_tokens, seed=seed)
    if edit:
        height, width = ctxs.out_hw
    else:
        height, width = int(height or g.height), int(width or g.width)
    image = inf.generate_image(ctxs, height=height, width=width, cfg=cfg, num_timesteps=int(g.num_timesteps),
                               timestep_shift=float(g.timestep_shift), seed=seed)
    info = dict(prompt=prompt, seed=seed, height=height, width=width, mode="edit" if edit else "t2i",
                num_timesteps=int(g.num_timesteps), timestep_shift=float(g.timestep_shift),
                image_condition=cond if edit else None, think=bool(g.think), thought=thought,
                cfg=cfg._asdict(), variant=config.variant)
    return image, info


def generate_mode(config, args) -> list[str]:
    """--mode generate; returns the written PNG paths."""
    from tqdm import tqdm

    g = config.generate
    requests = read_requests(args)
    inf = make_inferencer(config, args)
    out_dir = os.path.join(args.workdir, "generate")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    t0 = time.time()
    for r in tqdm(requests, desc="generate"):
        images = [load_image(p) for p in r["images"]]
        for k in range(int(g.num_images)):
            seed = int(r.get("seed", g.seed)) + k
            image, info = generate_one(inf, config, r["prompt"], images, seed, height=r.get("height"),
                                       width=r.get("width"))
            info.update(request_id=r["id"], input_images=r["images"])
            written.append(save_png(image, os.path.join(out_dir, f"{r['id']}_{k}.png"), info))
    print(f"generate: {len(written)} image(s) in {time.time() - t0:.1f}s -> {out_dir}")
    return written


# absl's app.run passes main's return value to sys.exit: the CLI entry points return None.
def run_understand(config, args) -> None:
    understand_mode(config, args)


def run_generate(config, args) -> None:
    generate_mode(config, args)
