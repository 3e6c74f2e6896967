"""Our Qwen2 vocab.json + merges.txt loading path vs transformers' Qwen2Tokenizer on the same (locally trained,
tiny) byte-level BPE files: identical ids, special tokens included."""

import os

import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
transformers = pytest.importorskip("transformers", reason="needs the [torch] extra")

from sgt_jax.data.tokenizer import load_tokenizer  # noqa: E402

TEXTS = [
    "the red circle  is\n\nleft of 12345 the blue's square?",
    "Ünïcode ça va 日本語 — dashes",
    "  lead spaces\ttab and trailing   ",
    "I'm sure they'll say WE'D re-do it: 3.14 + 2,718",
]


def test_vocab_merges_matches_transformers_qwen2_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "unit"))
    from test_tokenizer import _write_bpe_folder  # the same locally trained BPE files as the unit tests

    n = _write_bpe_folder(tmp_path)
    hf = transformers.Qwen2Tokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(str(tmp_path))
    for name in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"):
        assert ours._tok.token_to_id(name) == hf.convert_tokens_to_ids(name)
    assert ours.bos == n + 1
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
