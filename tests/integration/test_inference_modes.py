"""understand / generate / segment / evaluate end to end on the tiny config, from a checkpoint on disk.

The checkpoint is a random tiny BAGEL written with ``store.save_params`` (the imported-weights layout),
then every mode loads it through ``sgt_jax/sampling/loading.py`` exactly as the CLI does. The checks are
on what each mode writes (files, formats, metadata, score ranges), not on answer quality.
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.run_helpers import config_with, mode_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random tiny model saved as imported parameters (loading.random_params: no model-init compile)."""
    from sgt_jax.checkpoint import store
    from sgt_jax.configs_util import load_config
    from sgt_jax.sampling.loading import random_params

    wd = str(tmp_path_factory.mktemp("infer"))
    store.save_params(wd, random_params(load_config("configs/sgt_tiny.py")), {"source": "random tiny (test)"})
    img = np.zeros((64, 96, 3), np.uint8)
    img[10:40, 10:50] = (220, 40, 40)
    Image.fromarray(img).save(os.path.join(wd, "input.png"))
    return wd


_args = mode_args
# one scene size, 3 Euler steps, one KV-cache capacity for every request: fewer compiled shapes (the suite
# runs on 2 CPU cores)
SMALL = {"data.sources.synthetic.sizes": ((64, 64),), "generate.num_timesteps": 3, "generate.cache_bucket": 128,
         "understand.cache_bucket": 128}


def _config(**overrides):
    return config_with("configs/sgt_tiny.py", {**SMALL, **overrides})


def test_understand_single_and_batch(workdir):
    from sgt_jax.sampling.cli import understand_mode

    img = os.path.join(workdir, "input.png")
    path = understand_mode(_config(), _args(workdir, prompt="what colour is the square", images=(img,)))
    rec = [json.loads(l) for l in open(path)]
    assert len(rec) == 1 and isinstance(rec[0]["answer"], str) and rec[0]["settings"]["max_new_tokens"] == 16
    req = os.path.join(workdir, "questions.jsonl")
    with open(req, "w") as f:
        f.write(json.dumps({"id": "a", "question": "how many shapes are in the image", "image": "input.png"}) + "\n")
        f.write(json.dumps({"id": "b", "prompt": "what colour is the circle", "images": ["input.png"]}) + "\n")
    path = understand_mode(_config(), _args(workdir, input=req))
    recs = [json.loads(l) for l in open(path)]
    assert [r["id"] for r in recs] == ["a", "b"] and recs[1]["images"] == [img]


def test_generate_t2i_and_edit(workdir):
    from sgt_jax.sampling.cli import generate_mode

    req = os.path.join(workdir, "gen.jsonl")
    with open(req, "w") as f:
        f.write(json.dumps({"id": "t2i", "prompt": "a red circle", "seed": 7}) + "\n")
        f.write(json.dumps({"id": "edit", "prompt": "make it blue", "image": "input.png"}) + "\n")
    written = generate_mode(_config(), _args(workdir, input=req))
    assert [os.path.basename(p) for p in written] == ["t2i_0.png", "edit_0.png"]
    t2i = Image.open(written[0])
    assert t2i.size == (32, 32)  # config.generate.height/width of the tiny config
    meta = json.loads(t2i.text["sgt_jax"])
    assert meta["seed"] == 7 and meta["cfg"]["renorm_type"] == "global" and meta["num_timesteps"] == 3
    edit = Image.open(written[1])
    from sgt_jax.data.transforms import ImageTransform

    assert edit.size == ImageTransform(*_config().data.transforms.vae).output_size(96, 64) == (32, 20)
    sidecar = json.load(open(written[1].replace(".png", ".json")))
    assert sidecar["mode"] == "edit" and sidecar["cfg"]["renorm_type"] == "text_channel"
    # same request and seed -> the same image (reproducible); another seed -> another image
    first = np.asarray(Image.open(written[0]))
    again = generate_mode(_config(), _args(workdir, input=req))
    np.testing.assert_array_equal(first, np.asarray(Image.open(again[0])))
    other = generate_mode(_config(**{"generate.seed": 8}), _args(workdir, prompt="a red circle"))
    assert not np.array_equal(first, np.asarray(Image.open(other[0])))
    # think mode: text generated first (greedy, max_think_tokens) is recorded with the image
    think = generate_mode(_config(**{"generate.think": True, "generate.max_think_tokens": 3}),
                         _args(workdir, prompt="a red circle"))
    info = json.loads(Image.open(think[0]).text["sgt_jax"])
    assert info["think"] is True and isinstance(info["thought"], str)


def test_segment_synthetic_split(workdir):
    from sgt_jax.eval.cli import segment_mode

    summary = segment_mode(_config(), _args(workdir))
    out = os.path.join(workdir, "segment")
    rows = [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))]
    assert summary["n"] == summary["n_scored"] == len(rows) == 2
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and r["num_gt"] >= 1
        for suffix in ("input", "pred", "overlay"):
            assert os.path.exists(os.path.join(out, f"{r['key']}_{suffix}.png"))
    assert len(open(os.path.join(out, "results.csv")).read().splitlines()) == 3


def test_evaluate_mcq_real_tiny_model(workdir):
    from sgt_jax.eval.cli import evaluate_mode

    buf = io.BytesIO()
    Image.open(os.path.join(workdir, "input.png")).save(buf, format="PNG")
    bench = os.path.join(workdir, "bench.jsonl")
    with open(bench, "w") as f:
        for i in range(2):
            f.write(json.dumps(dict(idx=i, task="Count", question="how many shapes", choices=["one", "two"],
                                    answer="(A)", image="input.png")) + "\n")
    res = evaluate_mode(_config(**{"evaluate.kind": "mcq"}), _args(workdir, input=bench))
    assert res["n"] == 2 and 0.0 <= res["overall"] <= 1.0
    preds = [json.loads(l) for l in open(os.path.join(workdir, "evaluate", "mcq", "mcq_predictions.jsonl"))]
    assert len(preds) == 2 and all("output" in p for p in preds)


def test_evaluate_geneval_official_preset(workdir, capsys):
    """GenEval through the real tiny generator (generate_one returns a numpy array: it used to crash on
    .save), with the official preset's settings in the images GenEval reads: 1 image per prompt, 50 steps,
    CFG over [0, 1]."""
    from sgt_jax.eval.cli import evaluate_mode

    prompts = os.path.join(workdir, "evaluation_metadata_long.jsonl")
    with open(prompts, "w") as f:
        for p in ("a red circle", "a photo of two squares"):
            f.write(json.dumps({"tag": "single_object", "prompt": p, "include": []}) + "\n")
    cfg = _config(**{"evaluate.preset": "geneval_official", "evaluate.limit": 1})
    res = evaluate_mode(cfg, _args(workdir, input=prompts))
    assert res["prompts"] == 1 and res["images_written"] == 1
    assert "compares to BAGEL 0.88 -> SGT-BAGEL 0.90" in capsys.readouterr().out
    sample = os.path.join(workdir, "evaluate", "geneval", "00000", "samples")
    assert sorted(os.listdir(sample)) == ["0000.json", "0000.png"]
    assert Image.open(os.path.join(sample, "0000.png")).size == (32, 32)
    info = json.load(open(os.path.join(sample, "0000.json")))
    assert info["prompt"] == "a red circle" and info["num_timesteps"] == 50 and info["timestep_shift"] == 3.0
    assert info["cfg"]["interval"] == [0.0, 1.0] and info["cfg"]["text_scale"] == 4.0


def test_evaluate_probe_and_attention(workdir):
    from sgt_jax.eval.cli import evaluate_mode
    from sgt_jax.eval.lexicon import CATEGORIES

    res = evaluate_mode(_config(**{"evaluate.kind": "probe", "analysis.probe_num_images": 12}), _args(workdir))
    assert set(res) == {"vit", "llm1"}
    for r in res.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["n_test"] == 4
    out = os.path.join(workdir, "evaluate", "probe")
    assert all(os.path.exists(os.path.join(out, f)) for f in ("probe.csv", "probe_vit.png", "probe_llm1.png"))

    res = evaluate_mode(_config(**{"evaluate.kind": "attention"}), _args(workdir))
    per_layer = res["text_to_vision"]["per_layer"]
    assert len(per_layer) == 2 and all(0.0 < m < 1.0 for m in per_layer)
    shares = res["word_attention"]["mean_shares"]
    assert set(shares) == set(CATEGORIES) and abs(sum(shares.values()) - 1.0) < 1e-5
    out = os.path.join(workdir, "evaluate", "attention")
    for f in ("attn_text_to_vision.csv", "attn_text_to_vision.png", "attn_words.csv", "attn_words.png"):
        assert os.path.exists(os.path.join(out, f))
