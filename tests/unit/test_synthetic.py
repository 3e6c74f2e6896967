"""The synthetic shapes world, the rendering rule, proxy tasks and templates (sgt_jax/data)."""

import re
import sys

import numpy as np
import pytest

from sgt_jax.data import proxy_tasks, records, render, synthetic, templates

WORLD = synthetic.WorldConfig(seed=3, num_samples=64)


def _colour_name(rgb):
    for name, c in synthetic.COLOURS.items():
        if tuple(int(v) for v in rgb) == c:
            return name
    return None


def _scene_from_pixels(image, target, background):
    """Re-derives the shapes from the rendered pixels alone: each distinct target colour is one instance;
    its shape colour is read from the image; its kind from the fill ratio of its bounding box."""
    out = []
    colours = {tuple(c) for c in target.reshape(-1, 3)} - {(0, 0, 0)}
    for c in colours:
        m = (target == np.asarray(c, np.uint8)).all(-1)
        ys, xs = np.nonzero(m)
        img_cols = {tuple(v) for v in image[m]}
        assert len(img_cols) == 1, "an instance must be exactly one flat image colour"
        fill = m.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        kind = "square" if fill > 0.97 else "circle" if fill > 0.7 else "triangle"
        out.append({"colour": _colour_name(next(iter(img_cols))), "kind": kind,
                    "box": (xs.min(), ys.min(), xs.max(), ys.max())})
    return out


def test_deterministic_and_varied():
    a, b = synthetic.seg_sample(WORLD, 5), synthetic.seg_sample(WORLD, 5)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["target"], b["target"])
    c = synthetic.seg_sample(WORLD, 6)
    assert a["key"] != c["key"]
    assert synthetic.vqa_sample(WORLD, 5)["turns"] == synthetic.vqa_sample(WORLD, 5)["turns"]
    other = synthetic.seg_sample(synthetic.WorldConfig(seed=4), 5)
    assert other["image"].shape != a["image"].shape or not np.array_equal(other["image"], a["image"])
    sizes = {synthetic.make_scene(WORLD, i).height * 1000 + synthetic.make_scene(WORLD, i).width for i in range(40)}
    assert len(sizes) == len(WORLD.sizes)
    counts = {len(synthetic.make_scene(WORLD, i).shapes) for i in range(64)}
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("index", range(24))
def test_pixels_match_scene_and_answers(index):
    scene = synthetic.make_scene(WORLD, index)
    image, target, masks = synthetic.render_scene(scene)
    records.validate(synthetic.seg_sample(WORLD, index))
    records.validate(synthetic.vqa_sample(WORLD, index))
    assert image.shape == target.shape == (scene.height, scene.width, 3)
    # Background pixels: exactly where no mask is; target black there.
    covered = np.any(masks, axis=0)
    assert (image[~covered] == synthetic.BACKGROUNDS[scene.background]).all()
    assert (target[~covered] == 0).all()
    seen = _scene_from_pixels(image, target, scene.background)
    assert len(seen) == len(scene.shapes)
    assert sorted((s["colour"], s["kind"]) for s in seen) == sorted((s.colour, s.kind) for s in scene.shapes)
    # Every answer in the conversation is re-derived from the pixel-level description.
    turns = synthetic.conversation(scene, WORLD, index)
    assert turns[0]["value"].startswith("<image>\n") and len(turns) == 2 * WORLD.qa_per_sample
    for q, a in zip(turns[0::2], turns[1::2]):
        q, a = q["value"].replace("<image>\n", ""), a["value"]
        if m := re.fullmatch(r"How many shapes are in the image\?", q):
            assert a == f"{synthetic.NUMBER_WORDS[len(seen)].capitalize()}."
        elif m := re.fullmatch(r"How many (\w+)s are there\?", q):
            n = sum(s["kind"] == m[1] for s in seen)
            assert a == f"{synthetic.NUMBER_WORDS[n].capitalize()}."
        elif m := re.fullmatch(r"What colour is the (\w+)\?", q):
            (s,) = [s for s in seen if s["kind"] == m[1]]
            assert a == f"It is {s['colour']}."
        elif m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q):
            exists = any(s["colour"] == m[1] and s["kind"] == m[2] for s in seen)
            assert a == ("Yes." if exists else "No.")
        elif m := re.fullmatch(r"Is the (\w+) (\w+) (?:to the )?(left of|right of|above|below) the (\w+) (\w+)\?", q):
            (sa,) = [s for s in seen if (s["colour"], s["kind"]) == (m[1], m[2])]
            (sb,) = [s for s in seen if (s["colour"], s["kind"]) == (m[4], m[5])]
            ax0, ay0, ax1, ay1 = sa["box"]
            bx0, by0, bx1, by1 = sb["box"]
            truth = {"left of": ax1 < bx0, "right of": bx1 < ax0, "above": ay1 < by0, "below": by1 < ay0}[m[3]]
            opposite = {"left of": bx1 < ax0, "right of": ax1 < bx0, "above": by1 < ay0, "below": ay1 < by0}[m[3]]
            assert truth or opposite, "position questions must be unambiguous"
            assert a == ("Yes." if truth else "No.")
        elif q == "Describe the image.":
            for s in seen:
                assert f"{s['colour']} {s['kind']}" in a
            assert a.endswith(f"on a {scene.background} background.")
        else:
            pytest.fail(f"unexpected question {q!r}")


def test_question_kinds_all_occur():
    kinds = set()
    for i in range(64):
        scene = synthetic.make_scene(WORLD, i)
        kinds |= {k for k, _, _ in synthetic.questions(scene, np.random.default_rng(i))}
    assert kinds == {"count", "colour", "exists", "position", "caption"}


def test_palette_rule():
    p = render.palette("sa_1", 300)
    assert len({tuple(c) for c in p}) == 300 and not (p == 0).all(-1).any()
    np.testing.assert_array_equal(p[:10], render.palette("sa_1", 10))  # prefix-stable
    assert not np.array_equal(render.palette("sa_1", 5), render.palette("sa_2", 5))
    # saturation/value bounds of every colour
    mx, mn = p.max(1).astype(float), p.min(1).astype(float)
    assert (mx >= 0.7 * 255 - 1).all() and ((mx - mn) / mx >= 0.64).all()


def test_render_order_small_on_top():
    big = np.zeros((8, 8), bool)
    big[:, :] = True
    small = np.zeros((8, 8), bool)
    small[2:4, 2:4] = True
    out = render.render_instances([small, big], "k", 8, 8)  # annotation order: small first
    pal = render.palette("k", 2)
    assert (out[2:4, 2:4] == pal[1]).all()  # small is painted second (smaller area) -> on top
    assert (out[0, 0] == pal[0]).all()  # big gets the first colour
    assert (render.render_instances([], "k", 3, 4) == 0).all()
    ids = np.array([[0, 7], [9, 9]])
    idmap = render.render_id_map(ids, [7, 9], [1, 2], "k")
    assert (idmap[0, 0] == 0).all() and (idmap[0, 1] == pal[1]).all() and (idmap[1, 0] == pal[0]).all()


def test_proxy_tasks():
    s = synthetic.seg_sample(WORLD, 2)
    img = s["image"]
    for proxy, task in proxy_tasks.PROXY_TASKS.items():
        if proxy == "segmentation":
            continue
        out = records.validate(proxy_tasks.make_proxy_sample(img, s["key"], "synthetic", proxy, seed=1))
        assert out["task"] == task and out["target"].shape == img.shape
    rec = proxy_tasks.make_proxy_sample(img, "k", "s", "reconstruction")
    np.testing.assert_array_equal(rec["target"], img)
    # edge: binary, white exactly around the shapes' borders, black on flat areas
    e = proxy_tasks.edge_map(img)
    assert set(np.unique(e)) <= {0, 255} and (e[..., 0] == e[..., 1]).all()
    flat = np.full((16, 16, 3), 90, np.uint8)
    assert (proxy_tasks.edge_map(flat) == 0).all()
    step = flat.copy()
    step[:, 8:] = 200
    em = proxy_tasks.edge_map(step)[..., 0]
    assert (em[:, 7:9] == 255).all() and (em[:, :6] == 0).all() and (em[:, 10:] == 0).all()
    # inpaint: deterministic per (seed, key), changes some pixels to white or black only, target is clean
    a = proxy_tasks.make_proxy_sample(img, "k1", "s", "inpainting", seed=0)
    b = proxy_tasks.make_proxy_sample(img, "k1", "s", "inpainting", seed=0)
    c = proxy_tasks.make_proxy_sample(img, "k1", "s", "inpainting", seed=1)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    np.testing.assert_array_equal(a["target"], img)
    changed = (a["image"] != img).any(-1)
    assert 0 < changed.mean() < 0.8
    fills = {tuple(v) for v in a["image"][changed]}
    assert fills <= {(0, 0, 0), (255, 255, 255)} and len(fills) == 1
    with pytest.raises(ValueError, match="proxy_task"):
        proxy_tasks.task_of("depth")


def test_templates():
    for task in records.SEG_TASKS:
        ts = templates.templates_for(task)
        assert len(ts) >= 50 and len(set(ts)) == len(ts)
        assert all(3 <= len(t.split()) <= 16 and t[0].isupper() for t in ts)
    assert all("colo" in t.lower() for t in templates.SEGMENTATION)
    assert not any(w in t.lower() for t in templates.SEGMENTATION for w in ("semantic", "class"))
    assert templates.pick("seg", "a") == templates.pick("seg", "a")
    assert len({templates.pick("seg", f"k{i}") for i in range(100)}) > 30
    with pytest.raises(ValueError):
        templates.templates_for("vqa")


def test_tfds_builder_without_tensorflow(tmp_path, tiny_config, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    from data import shapes_tfds

    shapes_tfds.build(str(tmp_path), "tiny")
    ds = tfds.data_source("sgt_shapes/tiny", data_dir=str(tmp_path), split="train")
    assert len(ds) == 32
    ex = ds[7]
    index = int(ex["index"])
    ref = synthetic.seg_sample(synthetic.WorldConfig(seed=0, num_samples=32), index)
    np.testing.assert_array_equal(ex["image"], ref["image"])
    np.testing.assert_array_equal(ex["target"], ref["target"])
    # the same dataset as a training source (kind "tfds"), also after pickling (Grain workers)
    import pickle

    from sgt_jax.data import sources

    cfg = tiny_config
    for fam in ("seg", "vqa"):
        cfg.data.sources[fam].kind = "tfds"
        cfg.data.sources[fam].root = str(tmp_path)
        cfg.data.sources[fam].tfds_name = "sgt_shapes/tiny"
    seg = pickle.loads(pickle.dumps(sources.build_seg_source(cfg)))
    vqa = sources.build_vqa_source(cfg)
    s, v = seg.decode(seg[7]), vqa.decode(vqa[7])
    np.testing.assert_array_equal(s["target"], ref["target"])
    np.testing.assert_array_equal(v["images"][0], ref["image"])
    assert v["turns"][0]["value"].startswith("<image>\n") and v["turns"][1]["from"] == "gpt"
    from sgt_jax.data.sources.common import decode_canonical

    np.testing.assert_array_equal(decode_canonical(seg.canonical(seg[7]))["target"], ref["target"])
    assert "tensorflow" not in sys.modules
