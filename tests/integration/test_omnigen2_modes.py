"""understand / generate / segment / evaluate with the OmniGen2 config, end to end on a tiny random OmniGen2
workdir: the fixture folder (tests/fixtures/omnigen2_folder.py, written with diffusers and transformers)
converted by ``--mode import``, then every mode through the same entry points as the CLI. The checks are on
what each mode writes (files, sizes, recorded settings, score ranges) and on the resolution rule, not on
quality (random weights)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch", reason="the OmniGen2 fixture folder needs the [torch] extra")
pytest.importorskip("diffusers", reason="the OmniGen2 fixture folder needs the [torch] extra")

from tests.run_helpers import config_with, mode_args  # noqa: E402

pytestmark = pytest.mark.slow


# short answers, 2 Euler steps, one scene size: fewer compiled shapes
SMALL = {"understand.max_new_tokens": 4, "evaluate.mcq_max_new_tokens": 4, "generate.omnigen2.num_steps": 2,
         "data.sources.synthetic.sizes": ((64, 64),)}


def _config(**overrides):
    return config_with("configs/omnigen2_sgt.py:tiny", {**SMALL, **overrides})


_args = mode_args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from sgt_jax.checkpoint.convert import run_import
    from tests.fixtures.omnigen2_folder import write_omnigen2_folder

    root = tmp_path_factory.mktemp("og2_modes")
    folder = write_omnigen2_folder(str(root / "folder"))
    wd = str(root / "run")
    assert run_import(_config(), _args(wd, source=folder)) == 0
    img = np.zeros((64, 64, 3), np.uint8)  # the synthetic scenes' size: the same compiled shapes
    img[10:40, 10:50] = (220, 40, 40)
    Image.fromarray(img).save(os.path.join(wd, "input.png"))
    Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(os.path.join(wd, "wide.png"))
    return wd


def test_understand(workdir):
    from sgt_jax.sampling.cli import understand_mode

    path = understand_mode(_config(), _args(workdir, prompt="what colour is the square",
                                            images=(os.path.join(workdir, "input.png"),)))
    rec = [json.loads(line) for line in open(path)]
    assert len(rec) == 1 and isinstance(rec[0]["answer"], str) and rec[0]["settings"]["max_new_tokens"] == 4


def test_generate_t2i_and_edit(workdir):
    from sgt_jax.sampling.cli import generate_mode

    req = os.path.join(workdir, "gen.jsonl")
    with open(req, "w") as f:
        f.write(json.dumps({"id": "t2i", "prompt": "a red circle", "seed": 7}) + "\n")
        f.write(json.dumps({"id": "edit", "prompt": "make it blue", "image": "wide.png"}) + "\n")
    written = generate_mode(_config(), _args(workdir, input=req))
    assert [os.path.basename(p) for p in written] == ["t2i_0.png", "edit_0.png"]
    assert Image.open(written[0]).size == (32, 32)  # generate.height/width
    # one reference (align_res): 40x56 fitted to <= 32*32 pixels, sides floored to 8 (VAE 4 x patch 2)
    assert Image.open(written[1]).size == (32, 24)
    t2i, edit = (json.load(open(p[:-4] + ".json")) for p in written)
    assert t2i["mode"] == "t2i" and t2i["image_guidance_scale"] == 1.0 and t2i["seed"] == 7
    assert edit["mode"] == "edit" and edit["image_guidance_scale"] == 2.0 and edit["text_guidance_scale"] == 5.0


def test_segment_synthetic_split(workdir):
    from sgt_jax.eval.cli import segment_mode

    summary = segment_mode(_config(), _args(workdir))
    out = os.path.join(workdir, "segment")
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert summary["n"] == summary["n_scored"] == len(rows) == 2
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and r["num_gt"] >= 1
        assert (r["height"], r["width"]) == (32, 32)  # the 64x64 scene fitted to <= 32*32 pixels
        info = json.load(open(os.path.join(out, f"{r['key']}_pred.json")))
        assert info["mode"] == "segment" and info["family"] == "omnigen2"


def test_evaluate_mcq_and_geneval(workdir):
    from sgt_jax.eval.cli import evaluate_mode

    bench = os.path.join(workdir, "bench.jsonl")
    with open(bench, "w") as f:
        for i in range(2):
            f.write(json.dumps(dict(idx=i, task="Count", question="how many shapes", choices=["one", "two"],
                                    answer="(A)", image="input.png")) + "\n")
    res = evaluate_mode(_config(**{"evaluate.kind": "mcq"}), _args(workdir, input=bench))
    assert res["n"] == 2 and 0.0 <= res["overall"] <= 1.0
    prompts = os.path.join(workdir, "evaluation_metadata.jsonl")
    with open(prompts, "w") as f:
        f.write(json.dumps({"tag": "single_object", "prompt": "a red circle", "include": []}) + "\n")
    res = evaluate_mode(_config(**{"evaluate.kind": "geneval", "evaluate.geneval_n_per_prompt": 1}),
                        _args(workdir, input=prompts))
    assert res["images_written"] == 1
    assert Image.open(os.path.join(workdir, "evaluate", "geneval", "00000", "samples", "0000.png")).size == (32, 32)
    with pytest.raises(ValueError, match="BAGEL"):
        evaluate_mode(_config(**{"evaluate.kind": "probe"}), _args(workdir))
