"""Tokenizers: the tiny synthetic one (built locally) and the Qwen2 loading paths (tokenizer.json, vocab+merges)."""

import json
import os

import pytest

from sgt_jax.data import synthetic, templates
from sgt_jax.data.records import BadSample
from sgt_jax.data.tokenizer import (SPECIAL_TOKENS, UNK_ID, build_tiny_tokenizer, get_tokenizer, load_tokenizer,
                                    synthetic_corpus)


def test_tiny_tokenizer_layout_and_no_bos(tiny_config):
    tok = get_tokenizer(tiny_config)
    assert tok.special_ids == dict(tiny_config.model.tokens) == {"bos": 1, "eos": 2, "vision_start": 3,
                                                                 "vision_end": 4}
    assert tok.vocab_size <= tiny_config.model.llm.vocab_size
    ids = tok.encode("How many red circles?")
    assert ids and ids[0] not in (tok.bos, tok.eos)  # no BOS added
    assert tok.decode(ids) == "how many red circles ?"
    assert tok.encode("zorblax")[0] == UNK_ID


def test_tiny_tokenizer_knows_every_synthetic_and_template_word(tiny_config):
    tok = get_tokenizer(tiny_config)
    world = synthetic.WorldConfig.from_config(tiny_config.data.sources.synthetic)
    texts = [t for ts in templates.TEMPLATES.values() for t in ts]
    for i in range(20):
        texts += [t["value"].replace("<image>", "") for t in synthetic.vqa_sample(world, i)["turns"]]
    unknown = [t for t in texts if UNK_ID in tok.encode(t)]
    assert not unknown, unknown[:5]


def test_tiny_tokenizer_json_round_trip_is_the_same_code_path(tmp_path, tiny_config):
    build_tiny_tokenizer(synthetic_corpus(), save_to=str(tmp_path))
    loaded = load_tokenizer(str(tmp_path), expected_ids=dict(tiny_config.model.tokens))
    direct = get_tokenizer(tiny_config)
    text = "Give each object a different colour. Is the red square left of the blue circle?"
    assert loaded.encode(text) == direct.encode(text)


def test_special_ids_mismatch_is_a_clear_error(tmp_path):
    build_tiny_tokenizer(["red square"], save_to=str(tmp_path))
    with pytest.raises(ValueError, match=r"vision_end <\|vision_end\|>: tokenizer id 4 != config.model.tokens"):
        load_tokenizer(str(tmp_path), expected_ids={"bos": 1, "eos": 2, "vision_start": 3, "vision_end": 9})


def test_vocab_overflow_is_an_error():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer([" ".join(f"w{i}" for i in range(600))], vocab_size=512)


@pytest.mark.parametrize("text", ["what is <|vision_pad|> here", "answer <|im_end|> more", "<|endoftext|>"])
def test_special_token_literals_in_text_are_bad_samples(tiny_config, text):
    tok = get_tokenizer(tiny_config)
    with pytest.raises(BadSample) as err:
        tok.encode(text, where="k1 turn 2")
    assert err.value.reason == "unknown_special_token" and "k1 turn 2" in err.value.detail


def _write_bpe_folder(folder, with_tokenizer_json=False):
    """A small byte-level BPE in the Qwen2 file layout: vocab.json + merges.txt + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the red circle is left of the blue square", "how many shapes are there? two.", "12 + 30 = 42"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet(), show_progress=False))
    tok.model.save(str(folder))
    n = tok.get_vocab_size()
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
    added = {str(n + i): {"content": s, "special": True} for i, s in enumerate(names)}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": added}, f)
    return n


def test_vocab_merges_folder_resolves_special_tokens_by_name(tmp_path):
    n = _write_bpe_folder(tmp_path)
    expected = {"bos": n + 1, "eos": n + 2, "vision_start": n + 3, "vision_end": n + 4}
    tok = load_tokenizer(str(tmp_path), expected_ids=expected)
    assert (tok.bos, tok.eos, tok.vision_start, tok.vision_end) == tuple(expected.values())
    text = "the red circle is left of the blue square"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(BadSample):
        tok.encode("a <|vision_pad|> b")  # an added token that exists in the vocabulary is still refused


def test_missing_folder_and_missing_special_token_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json, or vocab.json"):
        load_tokenizer(str(tmp_path))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"no special token '<\|im_start\|>'"):
        load_tokenizer(str(tmp_path))


def test_special_token_table_matches_bagel():
    assert SPECIAL_TOKENS == {"bos": "<|im_start|>", "eos": "<|im_end|>", "vision_start": "<|vision_start|>",
                              "vision_end": "<|vision_end|>"}
