"""Packing: the static batch of docs/interfaces.md §1 from plans; metadata reproduces BAGEL's layout and mask."""

import dataclasses

import numpy as np
import pytest

from sgt_jax.data import synthetic
from sgt_jax.data.packing import BatchLayout, PackBudget, PackUsage, assemble_batch, efficiency
from sgt_jax.data.plans import sgt_plan, vqa_plan
from sgt_jax.data.tokenizer import get_tokenizer
from sgt_jax.data.transforms import Transforms, normalize


@pytest.fixture
def plans3(tiny_config):
    tok, tfm = get_tokenizer(tiny_config), Transforms.from_config(tiny_config)
    world = synthetic.WorldConfig.from_config(tiny_config.data.sources.synthetic)
    seg = [sgt_plan(synthetic.seg_sample(world, i), "Give each object a different colour.", tok, tfm,
                    drop_text=i == 1) for i in (0, 1)]
    vqa = vqa_plan(synthetic.vqa_sample(world, 2), tok, tfm)
    return [seg[0], vqa, seg[1]]


def _bagel_mask(split_lens, modes):
    """BAGEL data_utils.prepare_attention_mask_per_sample, transcribed (bool, True = may attend)."""
    n = sum(split_lens)
    m = np.zeros((n, n), bool)
    cs = 0
    for s, mode in zip(split_lens, modes):
        m[cs:cs + s, cs:cs + s] = np.tril(np.ones((s, s), bool)) if mode == 0 else True
        m[cs:cs + s, :cs] = True
        cs += s
    cs = 0
    for s, mode in zip(split_lens, modes):
        if mode == 2:
            m[:, cs:cs + s] = False
            m[cs:cs + s, cs:cs + s] = True
        cs += s
    return m


def _interface_mask(b, i):
    """The attention rule of docs/interfaces.md §1 on the PHYSICAL stream of pack i."""
    doc, split, mode, order = (b[k][i] for k in ("doc", "split", "mode", "order"))
    real = doc >= 0
    q, k = np.ix_(np.arange(doc.size), np.arange(doc.size))
    same_doc = (doc[q] == doc[k]) & real[q] & real[k]
    same_split = split[q] == split[k]
    allowed = (order[k] <= order[q]) | (same_split & np.isin(mode[q], (1, 2)))
    hidden = (mode[k] == 2) & ~same_split
    return same_doc & allowed & ~hidden


def test_pack_layout_matches_original_sequence(tiny_config, plans3):
    layout = BatchLayout.from_config(tiny_config)
    U, T = layout.budget.und_tokens, layout.budget.total_tokens
    b = assemble_batch([plans3, []], layout)
    # every key of the contract, with the stated shapes and dtypes
    Z, P, L, NI = (layout.budget.gen_tokens, layout.budget.vit_patches, layout.budget.ce_labels,
                   layout.budget.vae_images)
    shapes = {"tokens": (2, T), "kind": (2, T), "doc": (2, T), "split": (2, T), "mode": (2, T), "order": (2, T),
              "rope": (2, T), "vit_row": (2, T), "vit_patches": (2, P, 588), "vit_pos": (2, P),
              "vit_image": (2, P), "latent_pos": (2, Z), "latent_image": (2, Z), "latent_target": (2, Z),
              "vae_images": (2, NI, 32, 32, 3), "latent_rc": (2, Z, 2), "ce_pos": (2, L), "ce_label": (2, L),
              "ce_valid": (2, L)}
    for k, s in shapes.items():
        assert b[k].shape == s, k
    kind = b["kind"][0]
    assert set(kind[:U]) <= {0, 1, 2} and set(kind[U:]) <= {0, 3}
    assert sorted(b["order"][0]) == list(range(T))  # a permutation (pads after the real tokens)
    # un-reorder by `order` and compare with the concatenated plans
    real = b["doc"][0] >= 0
    perm = np.argsort(b["order"][0])[: real.sum()]
    for key in ("tokens", "kind", "mode", "rope"):
        np.testing.assert_array_equal(b[key][0][perm], np.concatenate([p[key] for p in plans3]), err_msg=key)
    np.testing.assert_array_equal(b["doc"][0][perm], np.concatenate([[d] * p["kind"].size
                                                                     for d, p in enumerate(plans3)]))
    splits = b["split"][0][perm]
    n_splits = [p["split"].max() + 1 for p in plans3]
    assert len(set(splits)) == sum(n_splits)  # unique within the pack
    # ViT tokens point at their patch rows; latent token U+i is latent row i
    vit_tok = np.where(kind == 2)[0]
    np.testing.assert_array_equal(b["vit_row"][0][vit_tok], np.arange(vit_tok.size))
    all_patches = np.concatenate([p["vit_patches"] for p in plans3])
    np.testing.assert_array_equal(b["vit_patches"][0][: vit_tok.size], normalize(all_patches))
    np.testing.assert_array_equal(b["vit_image"][0][: vit_tok.size],
                                  [0] * plans3[0]["n_vit"] + [1] * plans3[1]["n_vit"] + [2] * plans3[2]["n_vit"])
    n_lat = sum(p["n_gen"] for p in plans3)
    assert (kind[U:U + n_lat] == 3).all() and (kind[U + n_lat:] == 0).all()
    np.testing.assert_array_equal(b["latent_image"][0][:n_lat],
                                  [0] * plans3[0]["n_gen"] + [1] * plans3[2]["n_gen"])
    assert (b["latent_image"][0][n_lat:] == -1).all() and b["latent_target"][0][:n_lat].all()
    img1 = plans3[2]["vae_images"][0]
    np.testing.assert_array_equal(b["vae_images"][0, 1, : img1.shape[0], : img1.shape[1]], normalize(img1))
    assert (b["vae_images"][0, 1, img1.shape[0]:] == 0).all()
    # CE labels: on text tokens; label = the token that follows in ORIGINAL order (ends with <|im_end|>)
    nl = plans3[1]["n_ce"]
    assert b["ce_valid"][0].sum() == nl and (kind[b["ce_pos"][0][:nl]] == 1).all()
    next_tok = {int(o): int(t) for o, t in zip(b["order"][0], b["tokens"][0])}
    np.testing.assert_array_equal(b["ce_label"][0][:nl], [next_tok[int(b["order"][0][p]) + 1]
                                                         for p in b["ce_pos"][0][:nl]])
    # bookkeeping
    assert (b["n_seg"][0], b["n_vqa"][0], b["n_docs"][0]) == (2, 1, 3)
    assert b["useful_und"][0] == sum(p["n_und"] for p in plans3) and b["useful_gen"][0] == n_lat
    assert b["n_docs"][1] == 0 and (b["doc"][1] == -1).all()
    eff = efficiency(b, layout.budget)
    assert 0 < eff["tokens"] < 0.5


def test_mask_from_metadata_equals_bagel_mask(tiny_config, plans3):
    layout = BatchLayout.from_config(tiny_config)
    b = assemble_batch([plans3], layout)
    got = _interface_mask(b, 0)
    order = b["order"][0]
    phys_of = np.argsort(order)  # original index -> physical position
    start = 0
    for plan in plans3:
        n = plan["kind"].size
        lens = np.bincount(plan["split"]).tolist()
        modes = [int(plan["mode"][plan["split"] == s][0]) for s in range(len(lens))]
        ref = _bagel_mask(lens, modes)
        phys = phys_of[start:start + n]
        np.testing.assert_array_equal(got[np.ix_(phys, phys)], ref)
        start += n
    real = b["doc"][0] >= 0
    assert got[real].sum() == sum(_bagel_mask(np.bincount(p["split"]).tolist(),
                                              [int(p["mode"][p["split"] == s][0])
                                               for s in range(p["split"].max() + 1)]).sum() for p in plans3)
    assert not got[~real].any() and not got[:, ~real].any()


def test_budget_overflow_and_usage(tiny_config, plans3):
    layout = BatchLayout.from_config(tiny_config)
    n_gen = plans3[0]["n_gen"] + plans3[2]["n_gen"]
    small = dataclasses.replace(layout, budget=dataclasses.replace(layout.budget, gen_tokens=n_gen - 1))
    with pytest.raises(ValueError, match="overflows the budget"):
        assemble_batch([plans3], small)
    usage = PackUsage()
    assert usage.fits(plans3[0], small.budget)
    usage.add(plans3[0])
    assert not usage.fits(plans3[2], small.budget)  # the second latent block does not fit


def test_budget_config_errors(tiny_config):
    tiny_config.data.pack.vit_patches = 10_000
    with pytest.raises(ValueError, match="cannot exceed und_tokens"):
        PackBudget.from_config(tiny_config)
    tiny_config.data.pack.vit_patches = 0
    with pytest.raises(ValueError, match="vit_patches must be > 0"):
        PackBudget.from_config(tiny_config)


def test_cached_layout_needs_latents(tiny_config, plans3):
    tiny_config.data.latents = "cached"
    layout = BatchLayout.from_config(tiny_config)
    with pytest.raises(ValueError, match="no latent_mean"):
        assemble_batch([plans3], layout)
    for p in plans3:
        p["latent_mean"] = np.full((p["n_gen"], layout.latent_dim), 0.5, np.float32)
        p["latent_logvar"] = np.full((p["n_gen"], layout.latent_dim), -1.0, np.float32)
    b = assemble_batch([plans3], layout)
    assert "vae_images" not in b and b["latent_mean"].shape == (1, layout.budget.gen_tokens, 16)
    n = sum(p["n_gen"] for p in plans3)
    assert (b["latent_mean"][0, :n] == 0.5).all() and (b["latent_mean"][0, n:] == 0).all()
    tiny_config.data.latents = "both"
    with pytest.raises(ValueError, match="'online' or 'cached'"):
        BatchLayout.from_config(tiny_config)
