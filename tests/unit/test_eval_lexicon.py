"""Word categories of the attention-on-words analysis."""

import json

import pytest

from sgt_jax.eval.lexicon import Lexicon, load_lexicon


@pytest.mark.parametrize("word,cat", [
    ("red", "color"), ("Orange,", "color"), ("left", "position"), ("above", "position"), ("dogs", "object"),
    ("buses", "object"), ("circle.", "object"), ("a", "others"), ("photo", "others"), ("two", "others"),
    ("traffic", "object"), ("grey", "color"),
])
def test_builtin_categories(word, cat):
    assert load_lexicon().category(word) == cat


def test_lexicon_file(tmp_path):
    p = tmp_path / "lex.json"
    p.write_text(json.dumps({"object": ["piano"], "color": ["ebony"], "position": ["beside"]}))
    lex = load_lexicon(str(p))
    assert [lex.category(w) for w in ("pianos", "ebony", "beside", "red")] == ["object", "color", "position",
                                                                                "others"]
    p.write_text(json.dumps({"object": []}))
    with pytest.raises(ValueError, match="lacks"):
        Lexicon.from_file(str(p))
