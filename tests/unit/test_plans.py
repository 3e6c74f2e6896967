"""Sequence plans: token layouts, split modes, RoPE ids and CE labels against hand-written expectations."""

import numpy as np
import pytest

from sgt_jax.data import synthetic
from sgt_jax.data.packing import PackBudget
from sgt_jax.data.plans import check_budget, sgt_plan, vqa_plan
from sgt_jax.data.records import BadSample
from sgt_jax.data.tokenizer import get_tokenizer
from sgt_jax.data.transforms import Transforms

C, F, N = 0, 1, 2  # causal, full, noise
TXT, VIT, LAT = 1, 2, 3


@pytest.fixture
def env(tiny_config):
    return get_tokenizer(tiny_config), Transforms.from_config(tiny_config)


def _seg_sample(h=64, w=64, task="seg"):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    target = palette[rng.integers(0, 3, size=(h, w))]
    return {"task": task, "key": "s1", "source": "test", "image": image, "target": target}


def test_sgt_plan_layout(env):
    tok, tfm = env
    instr = "Colour each instance differently."
    ids = tok.encode(instr)
    n_ids = len(ids)
    plan = sgt_plan(_seg_sample(), instr, tok, tfm, drop_text=False)
    # tiny config: ViT (56,56,14) -> 56x56 -> 4x4 = 16 patches; VAE (32,16,4) -> 32x32 -> 8x8 = 64 latents
    vs, ve, bos, eos = tok.vision_start, tok.vision_end, tok.bos, tok.eos
    exp_tokens = [vs] + [0] * 16 + [ve] + [bos] + ids + [eos] + [vs] + [0] * 64 + [ve]
    exp_kind = [TXT] + [VIT] * 16 + [TXT] + [TXT] * (n_ids + 2) + [TXT] + [LAT] * 64 + [TXT]
    exp_split = [0] * 18 + [1] * (n_ids + 2) + [2] * 66
    exp_mode = [F] * 18 + [C] * (n_ids + 2) + [N] * 66
    # ViT block: RoPE 0 for all 18 tokens, then +1; text: 1..n+2; noisy target: n+3 shared, not advanced
    exp_rope = [0] * 18 + list(range(1, n_ids + 3)) + [n_ids + 3] * 66
    for key, exp in (("tokens", exp_tokens), ("kind", exp_kind), ("split", exp_split), ("mode", exp_mode),
                     ("rope", exp_rope)):
        np.testing.assert_array_equal(plan[key], exp, err_msg=key)
    assert plan["n_ce"] == 0 and plan["ce_pos"].size == 0  # no CE in a segmentation sample
    assert (plan["n_und"], plan["n_gen"], plan["n_vit"], plan["n_vae"]) == (18 + n_ids + 4, 64, 16, 1)
    np.testing.assert_array_equal(plan["vit_pos"], [r * 70 + c for r in range(4) for c in range(4)])
    np.testing.assert_array_equal(plan["latent_pos"], [r * 32 + c for r in range(8) for c in range(8)])
    np.testing.assert_array_equal(plan["latent_rc"][9], [1, 1])
    assert plan["latent_target"].all() and (plan["latent_image"] == 0).all()
    assert plan["group"] == "seg" and plan["vae_images"][0].shape == (32, 32, 3)


def test_sgt_text_dropout_does_not_advance_rope(env):
    tok, tfm = env
    plan = sgt_plan(_seg_sample(), "Colour each instance differently.", tok, tfm, drop_text=True)
    np.testing.assert_array_equal(plan["split"], [0] * 18 + [1] * 66)
    np.testing.assert_array_equal(plan["rope"], [0] * 18 + [1] * 66)
    np.testing.assert_array_equal(plan["mode"], [F] * 18 + [N] * 66)


def test_sgt_target_resize_nearest_for_maps_bicubic_for_photos(env):
    tok, tfm = env
    sample = _seg_sample(64, 96)
    palette = {tuple(c) for c in sample["target"].reshape(-1, 3)}
    seg = sgt_plan(sample, "x", tok, tfm, drop_text=False)["vae_images"][0]
    assert seg.shape == (20, 32, 3)  # (32,16,4): 64x96 -> long side 32, 21.3 -> 20
    assert {tuple(c) for c in seg.reshape(-1, 3)} <= palette
    recon = sgt_plan(dict(sample, task="recon"), "x", tok, tfm, drop_text=False)["vae_images"][0]
    assert not {tuple(c) for c in recon.reshape(-1, 3)} <= palette


def test_vqa_plan_layout_and_labels_end_with_im_end(env):
    tok, tfm = env
    img = np.zeros((64, 64, 3), np.uint8)
    turns = [{"from": "human", "value": "<image>\nHow many shapes are there?"}, {"from": "gpt", "value": "Two."},
             {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "Yes."}]
    plan = vqa_plan({"task": "vqa", "key": "q1", "source": "test", "images": [img], "turns": turns}, tok, tfm)
    q1, a1, q2, a2 = (tok.encode(t) for t in ("How many shapes are there?", "Two.", "Is it red?", "Yes."))
    vs, ve, bos, eos = tok.vision_start, tok.vision_end, tok.bos, tok.eos
    # VLM ViT (56,28,14): 64x64 -> 56x56 -> 16 patches
    blocks = [([vs] + [0] * 16 + [ve], F), ([bos] + q1 + [eos], C), ([bos] + a1 + [eos], C),
              ([bos] + q2 + [eos], C), ([bos] + a2 + [eos], C)]
    exp_tokens = sum((b for b, _ in blocks), [])
    np.testing.assert_array_equal(plan["tokens"], exp_tokens)
    np.testing.assert_array_equal(plan["split"], sum(([i] * len(b) for i, (b, _) in enumerate(blocks)), []))
    np.testing.assert_array_equal(plan["mode"], sum(([m] * len(b) for b, m in blocks), []))
    rope = [0] * 18
    r = 1
    for b, _ in blocks[1:]:
        rope += list(range(r, r + len(b)))
        r += len(b)
    np.testing.assert_array_equal(plan["rope"], rope)
    # CE: inputs <|im_start|> + answer, labels answer + <|im_end|>, for both gpt turns only
    start_a1 = 18 + len(q1) + 2
    start_a2 = start_a1 + len(a1) + 2 + len(q2) + 2
    exp_pos = list(range(start_a1, start_a1 + len(a1) + 1)) + list(range(start_a2, start_a2 + len(a2) + 1))
    np.testing.assert_array_equal(plan["ce_pos"], exp_pos)
    np.testing.assert_array_equal(plan["ce_label"], a1 + [eos] + a2 + [eos])
    assert plan["ce_label"][-1] == eos
    # next-token rule: every label is the input token right after its position
    np.testing.assert_array_equal(plan["ce_label"], plan["tokens"][plan["ce_pos"] + 1])
    assert plan["n_gen"] == 0 and plan["n_vae"] == 0 and plan["group"] == "vqa"


def test_vqa_multi_image_shares_max_pixels_and_text_only(env, tiny_config):
    tok, tfm = env
    img = np.zeros((64, 64, 3), np.uint8)
    turns = [{"from": "human", "value": "<image> and <image> compare"}, {"from": "gpt", "value": "Same."}]
    plan = vqa_plan({"task": "vqa", "key": "q2", "source": "t", "images": [img, img], "turns": turns}, tok, tfm)
    # 2 images share 56*56 px: 1568 each -> sqrt(1568/4096)*64 = 39.6 -> 42x42 -> 3x3 patches per image
    assert plan["n_vit"] == 18 and list(np.bincount(plan["vit_image"])) == [9, 9]
    kinds = plan["kind"]
    assert (plan["mode"][kinds == VIT] == F).all()
    text_only = vqa_plan({"task": "vqa", "key": "q3", "source": "t", "images": [],
                          "turns": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]},
                         tok, tfm)
    assert text_only["n_vit"] == 0 and text_only["vit_patches"].shape == (0, 588)


def test_vqa_bad_samples(env):
    tok, tfm = env
    img = np.zeros((64, 64, 3), np.uint8)

    def reason(images, turns):
        with pytest.raises(BadSample) as err:
            vqa_plan({"task": "vqa", "key": "b", "source": "t", "images": images, "turns": turns}, tok, tfm)
        return err.value.reason

    assert reason([img, img], [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "a"}]) == \
        "image_count_mismatch"
    assert reason([], [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]) == "empty_conversation"
    assert reason([], [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "no <|vision_pad|>"}]) == \
        "unknown_special_token"


def test_over_budget(env):
    tok, tfm = env
    world_plan = vqa_plan(synthetic.vqa_sample(synthetic.WorldConfig(), 0), tok, tfm)
    big = PackBudget(und_tokens=4096, gen_tokens=4096, vit_patches=4096, ce_labels=4096, vae_images=8)
    assert check_budget(world_plan, big) is world_plan
    small = PackBudget(und_tokens=20, gen_tokens=4096, vit_patches=4096, ce_labels=4096, vae_images=8)
    with pytest.raises(BadSample) as err:
        check_budget(world_plan, small)
    assert err.value.reason == "over_budget" and "und tokens" in err.value.detail
