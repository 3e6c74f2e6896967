"""The reusable pieces of the small-scale SGT study (bench/toy_sgt.py): the shapes-world detector and its
GenEval-style score, bootstrap intervals, the t2i plan, relative-size questions, the small config, the
study's fixed-count iterator and its stage skipping."""

import os
import sys

import numpy as np
import pytest

from sgt_jax.data import synthetic
from sgt_jax.eval import bootstrap, shapes_detector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    for p in (os.path.join(ROOT, "bench"), os.path.join(ROOT, "configs")):
        if p not in sys.path:
            sys.path.insert(0, p)


@pytest.mark.parametrize("sizes", [((64, 64),), ((64, 64), (64, 96), (96, 64))])
def test_detector_reads_every_render(sizes):
    world = synthetic.WorldConfig(seed=7, sizes=sizes)
    n_true = hits = fp = 0
    for i in range(150):
        scene = synthetic.make_scene(world, 100_000 + i)
        r = shapes_detector.match_scene(shapes_detector.detect(synthetic.render_scene(scene)[0]), scene)
        n_true, hits, fp = n_true + r["n_true"], hits + r["hits"], fp + r["false_positives"]
    assert n_true > 300 and hits == n_true and fp == 0


def test_geneval_score_checks():
    world = synthetic.WorldConfig(seed=3, sizes=((64, 64),), min_shapes=2)
    scene = next(s for s in (synthetic.make_scene(world, i) for i in range(100))
                 if len({(x.colour, x.kind) for x in s.shapes}) == len(s.shapes)
                 and len({x.cx for x in s.shapes}) == len(s.shapes))
    expected = shapes_detector.expected_of(scene)
    dets = shapes_detector.detect(synthetic.render_scene(scene)[0])
    assert shapes_detector.geneval_score(dets, expected) == dict(present=True, count=True, colour=True,
                                                                 position=True, overall=True)
    missing = shapes_detector.geneval_score(dets[1:], expected)
    assert not missing["present"] and not missing["count"] and not missing["overall"]
    swapped = shapes_detector.geneval_score(dets, expected[::-1])
    assert swapped["present"] and swapped["count"] and not swapped["position"] and not swapped["overall"]
    recoloured = [d.__class__(("red" if d.colour != "red" else "blue"), d.kind, d.cx, d.cy, d.area, d.box)
                  for d in dets]
    assert not shapes_detector.geneval_score(recoloured, expected)["colour"]


def test_detector_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        shapes_detector.detect(np.zeros((8, 8, 3), np.float32))


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    x = (rng.random((3, 400)) < 0.7).astype(float)
    ci = bootstrap.mean_ci(x)
    assert ci["lo"] < ci["mean"] < ci["hi"] and abs(ci["mean"] - x.mean()) < 1e-12
    assert 0.02 < ci["hi"] - ci["lo"] < 0.15  # ~ 2*1.96*sqrt(.21/1200) = 0.05, plus seed spread
    assert bootstrap.mean_ci(np.ones((2, 50)))["lo"] == 1.0
    # seeds that disagree widen the interval beyond what the items alone give
    spread = np.stack([np.full(400, 0.5), np.full(400, 0.9), np.full(400, 0.7)])
    assert bootstrap.mean_ci(spread)["hi"] - bootstrap.mean_ci(spread)["lo"] > 0.2
    d = bootstrap.diff_ci(x, x)
    assert d["diff"] == 0.0 and d["lo"] <= 0.0 <= d["hi"]
    better = np.minimum(x + (rng.random(x.shape) < 0.3), 1.0)
    assert bootstrap.diff_ci(better, x)["lo"] > 0
    with pytest.raises(ValueError, match="same items"):
        bootstrap.diff_ci(x, x[:, :10])
    with pytest.raises(ValueError, match="seeds, items"):
        bootstrap.mean_ci(np.zeros((0, 3)))


def test_size_questions_follow_pixels_and_default_world_unchanged():
    world = synthetic.WorldConfig(seed=1, sizes=((64, 64),), size_questions=True)
    n = 0
    for i in range(60):
        scene = synthetic.make_scene(world, i)
        _, _, masks = synthetic.render_scene(scene)
        area = {s.name: int(m.sum()) for s, m in zip(scene.shapes, masks)}
        for kind, q, a in synthetic.questions(scene, np.random.default_rng(i), size_questions=True):
            if kind != "size":
                continue
            n += 1
            rel = "bigger" if " bigger than " in q else "smaller"
            first, second = q[len("Is the "):-1].split(f" {rel} than the ")
            big, small = max(area[first], area[second]), min(area[first], area[second])
            assert big >= synthetic.SIZE_RATIO * small
            truth = area[first] > area[second] if rel == "bigger" else area[first] < area[second]
            assert a == ("Yes." if truth else "No.")
    assert n > 20
    plain = synthetic.WorldConfig(seed=1)
    for i in range(20):
        assert all(k != "size" for k, _, _ in synthetic.questions(synthetic.make_scene(plain, i),
                                                                 np.random.default_rng(i)))


def _small_config():
    _bench()
    import bagel_sgt

    return bagel_sgt.get_config("small")


def test_t2i_plan_layout():
    from sgt_jax.data import plans
    from sgt_jax.data.tokenizer import get_tokenizer
    from sgt_jax.data.transforms import Transforms

    c = _small_config()
    tok, tfm = get_tokenizer(c), Transforms.from_config(c)
    scene = synthetic.make_scene(synthetic.WorldConfig.from_config(c.data.sources.synthetic), 5)
    image = synthetic.render_scene(scene)[0]
    p = plans.t2i_plan(synthetic.caption(scene), image, scene.key, "synthetic", tok, tfm, drop_text=False)
    n_text = len(tok.encode(synthetic.caption(scene))) + 2
    assert p["task"] == "t2i" and p["group"] == "seg" and p["n_vit"] == 0 and p["n_ce"] == 0
    assert p["n_gen"] == 8 * 8 and p["latent_target"].all() and p["n_vae"] == 1
    assert p["n_und"] == n_text + 2  # prompt split + the latent block's two markers
    assert (p["rope"][:n_text] == np.arange(n_text)).all() and (p["rope"][n_text:] == n_text).all()
    d = plans.t2i_plan("ignored", image, scene.key, "synthetic", tok, tfm, drop_text=True)
    assert d["n_und"] == 2 and (d["rope"] == 0).all()


def test_small_config_size():
    import jax

    from sgt_jax.models.bagel import abstract_params

    target = abstract_params(_small_config().model)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target))
    assert 5e6 < n <= 30e6


def test_fixed_count_iterator_same_vqa_and_resume():
    _bench()
    import toy_sgt_lib

    c = _small_config()
    sft = toy_sgt_lib.FixedCountIterator(c, n_vqa=1, n_gen=0, gen_task="t2i", data_seed=5)
    sgt = toy_sgt_lib.FixedCountIterator(c, n_vqa=1, n_gen=4, gen_task="segmentation", data_seed=5)
    for _ in range(2):
        a, b = next(sft), next(sgt)
        assert int(a["n_vqa"].sum()) == int(b["n_vqa"].sum()) == 1
        assert int(a["n_seg"].sum()) == 0 and int(b["n_seg"].sum()) == 4
        ce_a = a["ce_label"][a["ce_valid"]]
        ce_b = b["ce_label"][b["ce_valid"]]
        np.testing.assert_array_equal(ce_a, ce_b)  # the same VQA answers at every step
    state = sgt.get_state()
    want = next(sgt)
    again = toy_sgt_lib.FixedCountIterator(c, n_vqa=1, n_gen=4, gen_task="segmentation", data_seed=5)
    again.set_state(state)
    got = next(again)
    for k in ("tokens", "latent_target", "vit_patches"):
        np.testing.assert_array_equal(got[k], want[k])
    too_many = toy_sgt_lib.FixedCountIterator(c, n_vqa=1, n_gen=5, gen_task="segmentation", data_seed=5)
    with pytest.raises(ValueError, match="do not fit"):
        next(too_many)


def test_stage_runner_skips_finished_stages(tmp_path):
    _bench()
    import toy_sgt

    calls = []
    fn = lambda: calls.append(1) or {"x": len(calls)}  # noqa: E731
    assert toy_sgt.run_stage(str(tmp_path), "a", fn, log=lambda *_: None) == {"x": 1}
    assert toy_sgt.run_stage(str(tmp_path), "a", fn, log=lambda *_: None) == {"x": 1}
    assert calls == [1] and set(toy_sgt.stage_seconds(str(tmp_path))) == {"a"}

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        toy_sgt.run_stage(str(tmp_path), "b", boom, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "stages" / "b.json")  # an unfinished stage runs again next time


def test_report_checks_the_papers_ordering():
    """The report's ordering section says 'higher' only when the paired interval excludes 0."""
    _bench()
    import toy_sgt_report

    rng = np.random.default_rng(0)
    q = 200
    base = rng.random(q) < 0.5
    flip = lambda p: np.where(rng.random(q) < p, ~base, base)  # noqa: E731 - a near copy of base
    evals = {"base": {"mcq": [{"correct": c} for c in base]}}
    acc = {"sft": base, "sgt_2to1": base | (rng.random(q) < 0.6), "recon_2to1": flip(0.05)}
    for arm, corr in acc.items():
        for s in range(2):
            evals[f"{arm}_s{s}"] = {"mcq": [{"correct": c} for c in corr]}
    mcq = {a: bootstrap.mean_ci(toy_sgt_report._matrix(evals, a, 2, "mcq", "correct")) for a in ("base", *acc)}
    text = "\n".join(toy_sgt_report._ordering_section(evals, 2, mcq, None))
    assert "sgt_2to1 is higher than sft" in text
    assert "sgt_2to1 is higher than recon_2to1" in text
    assert "edge_2to1 is" not in text  # an arm that was not evaluated is not compared
    assert "Arms by mean MCQ accuracy here: sgt_2to1" in text
    acc2 = dict(evals)
    for s in range(2):
        acc2[f"recon_2to1_s{s}"] = evals[f"sft_s{s}"]
    text2 = "\n".join(toy_sgt_report._ordering_section(acc2, 2, mcq, None))
    assert "sgt_2to1 is higher than recon_2to1" in text2
    acc2["sgt_2to1_s0"] = acc2["sgt_2to1_s1"] = evals["sft_s0"]
    text3 = "\n".join(toy_sgt_report._ordering_section(acc2, 2, mcq, None))
    assert "sgt_2to1 is not distinguishable from sft: +0.0 points" in text3


def test_answer_bias_detects_a_constant_answer():
    """A model that answers option 0 to every question of a kind has a top share of 1 and the accuracy
    of the label frequency; one that follows the image has the answers' own spread."""
    _bench()
    import toy_sgt_report

    answers = [0, 1, 1, 0, 1, 1, 1, 0]
    constant = [{"kind": "exists", "pred": 0, "answer": a, "correct": int(a == 0)} for a in answers]
    follows = [{"kind": "exists", "pred": a, "answer": a, "correct": 1} for a in answers]
    evals = {"base": {"mcq": constant}, "sft_s0": {"mcq": follows}, "sft_s1": {"mcq": constant}}
    assert toy_sgt_report.answer_bias(evals, "base", 2, "exists") == {"top_share": 1.0, "majority_accuracy": 5 / 8}
    pooled = toy_sgt_report.answer_bias(evals, "sft", 2, "exists")  # zeros: 3 (seed 0) + 8 (seed 1) of 16
    assert pooled["top_share"] == (3 + 8) / 16
    assert toy_sgt_report.answer_bias(evals, "sft", 2, "count") is None
    text = "\n".join(toy_sgt_report._answer_bias_section(evals, 2, ["base", "sft"]))
    assert "| base | n/a | n/a | n/a | n/a | 100 % |" in text and "exists 62 %" in text
