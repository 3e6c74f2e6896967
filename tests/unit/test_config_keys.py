"""Every config field the code reads is defined in the configs (with its default), and nothing reads a field
through ``.get(key, default)``, which would hide an undefined key until a user overrides it."""

import io
import os
import re
import tokenize

import pytest

from sgt_jax.configs_util import load_config

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "sgt_jax")
# ConfigDict methods that may end an attribute chain
METHODS = {"get", "keys", "items", "values", "to_dict", "to_json", "update", "unlocked", "lock", "unlock",
           "copy_and_resolve_references", "get_type", "ignore_type", "to_json_best_effort"}
# the section a local name stands for, where the code names a section by another name
ALIASES = {"cfg_model": "model", "model_cfg": "model", "train_cfg": "train", "srcs_cfg": "data.sources"}
SPECS = ["configs/bagel_sgt.py:7b", "configs/bagel_sgt.py:tiny", "configs/omnigen2_sgt.py:3b",
         "configs/omnigen2_sgt.py:tiny"]
# Family-specific sections: a field under these may be absent from the other family's configs, but must be
# defined in at least one config (model.llm is BAGEL's, model.mllm / data.omnigen2 / generate.omnigen2
# OmniGen2's).
FAMILY_SECTIONS = ("model", "data.omnigen2", "generate.omnigen2")


def _sources():
    for root, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, PKG), _code_only(f.read())


def _code_only(text: str) -> str:
    """The source with comments and plain strings (docstrings, messages) blanked out; f-string fields stay
    on Python >= 3.12, where tokenize splits f-strings."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            continue
        out.append(tok.string)
    return " ".join(out)


def _chains():
    names = "|".join(["config"] + list(ALIASES))
    pat = re.compile(r"\b(" + names + r")((?:\s*\.\s*[A-Za-z_]\w*)+)")
    for rel, text in _sources():
        for m in pat.finditer(text):
            head = ALIASES.get(m.group(1), "")
            chain = re.sub(r"\s+", "", m.group(2))[1:]
            yield rel, m.group(1) + "." + chain, ".".join(([head] if head else []) + [chain]).split(".")


def _undefined(cfg, parts) -> str | None:
    """The dotted prefix of ``parts`` that ``cfg`` lacks, or None when the chain resolves."""
    node = cfg
    for i, part in enumerate(parts):
        if part in METHODS or not hasattr(node, "keys"):
            return None  # a ConfigDict method, or a value's own attribute (e.g. a tuple's .index)
        if part not in node:
            return ".".join(parts[: i + 1])
        node = node[part]
    return None


@pytest.mark.parametrize("spec", SPECS)
def test_every_field_the_code_reads_is_defined(spec):
    cfg = load_config(spec)
    others = [load_config(s) for s in SPECS if s != spec]
    missing = set()
    for rel, text, parts in _chains():
        gap = _undefined(cfg, parts)
        if gap is None:
            continue
        family_only = any(gap == s or gap.startswith(s + ".") for s in FAMILY_SECTIONS)
        if family_only and any(_undefined(o, parts) is None for o in others):
            continue
        missing.add(f"{rel}: {text}")
    assert not missing, "read but not defined in " + spec + ":\n" + "\n".join(sorted(missing))


def test_no_config_field_is_read_with_a_default():
    names = "|".join(["config", "tc", "section", "dist", "c"] + list(ALIASES))
    pat = re.compile(r"\b(?:" + names + r")(?:\s*\.\s*\w+)*\s*\.\s*get\s*\(")
    hits = [f"{rel}: {m.group(0)}" for rel, text in _sources() for m in pat.finditer(text)]
    assert not hits, "\n".join(hits)
