"""OmniGen2 rows (sgt_jax/data/omnigen2_plan.py) and their iterator (sgt_jax/data/omnigen2_pipeline.py)."""

import numpy as np
import pytest

from sgt_jax.configs_util import load_config
from sgt_jax.data import omnigen2_plan as plan
from sgt_jax.data.omnigen2_pipeline import make_train_iterator
from sgt_jax.data.records import BadSample
from sgt_jax.data.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def setup():
    c = load_config("configs/omnigen2_sgt.py:tiny")
    return c, get_tokenizer(c), plan.PlanConfig.from_config(c)


def _seg_sample(h=64, w=96):
    rng = np.random.default_rng(0)
    target = np.zeros((h, w, 3), np.uint8)
    target[: h // 2, : w // 3] = (255, 0, 0)
    target[h // 2:, w // 3:] = (0, 0, 255)
    return {"task": "seg", "key": "k", "source": "t", "image": rng.integers(0, 255, (h, w, 3), np.uint8),
            "target": target}


def test_seg_row_template_and_target(setup):
    c, tok, pc = setup
    row = plan.seg_plan(_seg_sample(), "segment instances with different colors", tok, pc)
    n = int((row["doc"] >= 0).sum())
    ids = row["tokens"][:n].tolist()
    assert ids[0] == tok.bos and ids[-len(tok.encode("assistant\n")) - 1] == tok.bos  # open assistant header
    assert ids.count(tok.bos) == 3 and ids.count(tok.eos) == 2
    n_img = ids.count(pc.image_token)
    vs = ids.index(tok.vision_start)
    assert ids[vs + 1: vs + 1 + n_img] == [pc.image_token] * n_img and ids[vs + 1 + n_img] == tok.vision_end
    assert n_img == int((row["vit_image"] >= 0).sum()) // 4 and (row["vision_index"] >= 0).sum() == n_img
    assert not row["ce_valid"].any() and (row["n_seg"], row["n_vqa"]) == (1, 0)
    # target: 64x96 -> <= 32 per side and <= 32^2 pixels, floored to multiples of 4: 20x32 -> 5x8 tokens
    assert row["target_hw"].tolist() == [5, 8]
    colours = {tuple(v) for v in row["target_images"][:20, :32].reshape(-1, 3).tolist()}
    assert colours <= {(-1.0, -1.0, -1.0), (1.0, -1.0, -1.0), (-1.0, -1.0, 1.0)}  # nearest: no blended colours
    assert not row["target_images"][20:].any() and not row["target_images"][:, 32:].any()
    # M-RoPE: the image tokens share the temporal position, text counts on after max(h, w)
    assert (row["mrope"][:, :vs + 1] == np.arange(vs + 1)).all()


def test_vqa_row_labels_every_answer_and_its_end(setup):
    c, tok, pc = setup
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    sample = {"task": "vqa", "key": "q", "source": "t", "images": [img],
              "turns": [{"from": "human", "value": "<image>\nhow many shapes?"}, {"from": "gpt", "value": "two"},
                        {"from": "human", "value": "what color?"}, {"from": "gpt", "value": "red"}]}
    row = plan.vqa_plan(sample, tok, pc)
    labels = row["ce_label"][row["ce_valid"]].tolist()
    assert labels == tok.encode("two") + [tok.eos] + tok.encode("red") + [tok.eos]
    pos = row["ce_pos"][row["ce_valid"]]
    assert (row["tokens"][pos + 1] == row["ce_label"][row["ce_valid"]]).all()  # position i predicts i + 1
    assert not row["target_hw"].any() and (row["n_seg"], row["n_vqa"]) == (0, 1)
    bad = dict(sample, images=[])
    with pytest.raises(BadSample, match="1 <image> markers, 0 images"):
        plan.vqa_plan(bad, tok, pc)


def test_target_size_rule_3b():
    c = load_config("configs/omnigen2_sgt.py:3b")
    pc = plan.PlanConfig.from_config(c)
    for h, w in ((1500, 2250), (2250, 1500), (1024, 1024), (600, 800), (4000, 500)):
        th, tw = plan.target_size(h, w, pc)
        assert th * tw <= 1024 ** 2 and max(th, tw) <= 1024 and th % 16 == 0 and tw % 16 == 0
        assert th <= h and tw <= w
    assert plan.target_size(600, 800, pc) == (592, 800)  # downscale only (floored to 16)


def test_over_budget_is_skipped_with_its_reason(setup):
    c, tok, pc = setup
    small = plan.PlanConfig(**{**pc.__dict__, "text_tokens": 8})
    with pytest.raises(BadSample, match="text tokens .* > 8"):
        plan.seg_plan(_seg_sample(), "segment", tok, small)


def test_iterator_quota_pattern_and_exact_resume():
    c = load_config("configs/omnigen2_sgt.py:tiny")
    c.data.packs_per_batch = 6
    it = make_train_iterator(c)
    b = next(it)
    assert b["n_seg"].tolist() == [1, 1, 0, 1, 1, 0]  # [seg, seg, vqa] per group: single-task micro-batches
    state = it.get_state()
    b2 = next(it)
    it2 = make_train_iterator(c)
    it2.set_state(state)
    b3 = next(it2)
    assert all(np.array_equal(b2[k], b3[k]) for k in b2)
    assert it.stats()["seg_per_vqa"] == 2.0
    c.data.packs_per_batch = 4
    with pytest.raises(ValueError, match="whole groups of seg\\+vqa = 3"):
        make_train_iterator(c)
