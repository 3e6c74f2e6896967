"""Qwen2.5-VL folder import/export (sgt_jax/checkpoint/qwen2_5_vl_folder.py) on tiny random folders, 1 CPU device.

Checked: the table reproduces the fixture's independent key listing (both layouts, tied and untied);
import of a sharded legacy folder (with index) and of a single-file current-layout folder gives exactly
the in-memory conversion; export writes the same keys, shapes, dtypes and file split, bit-identical
tensor by tensor; a config.json that disagrees with the headers is refused with one line naming the
tensor, before any tensor byte is read.
"""

import json
import os

import numpy as np
import pytest

from sgt_jax.checkpoint import qwen2_5_vl_folder as qf
from sgt_jax.checkpoint import qwen2_5_vl_table as qt
from sgt_jax.checkpoint import safetensors_io
from sgt_jax.checkpoint.table import flatten_paths
from sgt_jax.configs_util import load_config
from sgt_jax.models.qwen2_5_vl import config as qwen_config
from tests.fixtures.compare import assert_same_safetensors
from tests.fixtures.qwen2_5_vl_folder import key_shapes, write_qwen2_5_vl_folder


@pytest.fixture(scope="module")
def run_config():
    return load_config("configs/sgt_tiny.py")


@pytest.mark.parametrize("layout", ["legacy", "current"])
@pytest.mark.parametrize("tied", [True, False])
def test_table_matches_the_fixture_listing(layout, tied):
    cfg = qwen_config("tiny")
    cfg.text.tie_word_embeddings = tied
    assert qt.expected_keys(cfg, layout, with_lm_head=not tied) == key_shapes(cfg, layout)
    big = qwen_config("3b")
    listing = key_shapes(big, layout)
    assert qt.expected_keys(big, layout, with_lm_head=False) == listing
    # Qwen2.5-VL-3B: 3.75 B parameters (tied head counted once)
    assert sum(int(np.prod(s)) for s in listing.values()) == 3_754_622_976


@pytest.mark.parametrize("layout,shards,lm_head", [("legacy", 2, True), ("current", 1, False)])
def test_import_export_round_trip_bit_identical(tmp_path, run_config, layout, shards, lm_head):
    cfg = qwen_config("tiny")
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    sd = write_qwen2_5_vl_folder(src, cfg, layout=layout, shards=shards, lm_head=lm_head, seed=3)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 128}, f)

    params, got_cfg, meta = qf.import_qwen2_5_vl(src, run_config)
    assert meta["layout"] == layout
    assert got_cfg.text.to_dict() == cfg.text.to_dict() and got_cfg.vision.to_dict() == cfg.vision.to_dict()
    want = qt.state_dict_to_params(sd, cfg)
    flat_got = flatten_paths(params)
    flat_want = flatten_paths(want)
    assert sorted(flat_got) == sorted(flat_want)
    for k, v in flat_want.items():
        np.testing.assert_array_equal(np.asarray(flat_got[k]), v, err_msg="/".join(k))

    qf.export_qwen2_5_vl(params, got_cfg, out, meta)
    src_files = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == src_files
    assert os.path.exists(os.path.join(out, qf.INDEX)) == (shards > 1)
    for name in src_files:
        assert_same_safetensors(os.path.join(src, name), os.path.join(out, name))
    assert ("lm_head.weight" in qf.open_folder(out).header) == lm_head
    with open(os.path.join(src, "config.json")) as a, open(os.path.join(out, "config.json")) as b:
        assert json.load(a) == json.load(b)
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))


def test_config_header_disagreement_refused_before_reading(tmp_path, run_config, monkeypatch):
    cfg = qwen_config("tiny")
    src = str(tmp_path / "src")
    write_qwen2_5_vl_folder(src, cfg, shards=2)
    with open(os.path.join(src, "config.json")) as f:
        cj = json.load(f)
    cj["vocab_size"] = cfg.text.vocab_size + 8  # the config now disagrees with embed_tokens' header
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cj, f)

    def no_read(*a, **k):
        raise AssertionError("a tensor was read before the folder was checked")

    monkeypatch.setattr(safetensors_io.SliceReader, "read", no_read)
    with pytest.raises(qf.FolderError) as err:
        qf.import_qwen2_5_vl(src, run_config)
    assert err.value.problems == [
        f"model.embed_tokens.weight has shape [{cfg.text.vocab_size}, {cfg.text.hidden_size}], config.json implies "
        f"[{cfg.text.vocab_size + 8}, {cfg.text.hidden_size}]"]


def test_missing_and_unexpected_tensors_are_named(tmp_path, run_config):
    cfg = qwen_config("tiny")
    src = str(tmp_path / "src")
    sd = write_qwen2_5_vl_folder(src, cfg)
    sd.pop("visual.blocks.1.attn.qkv.bias")
    sd["visual.blocks.1.attn.extra"] = np.zeros(3, np.float32)
    safetensors_io.write_all(os.path.join(src, "model.safetensors"), sorted(sd.items()))
    with pytest.raises(qf.FolderError) as err:
        qf.import_qwen2_5_vl(src, run_config)
    assert err.value.problems == ["missing in the safetensors: visual.blocks.1.attn.qkv.bias (expected shape [96])",
                                  "unexpected in the safetensors: visual.blocks.1.attn.extra (shape [3])"]
