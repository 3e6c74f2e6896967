"""Text tokenizers: BAGEL's Qwen2 BPE from a checkpoint folder, and a tiny word-level one for the synthetic world.

Both are ``tokenizers.Tokenizer`` objects behind the same small wrapper (:class:`TextTokenizer`), so the plan
builder never knows which one it has. The tiny tokenizer is *built locally* from the synthetic world's words
(no download) and serialised to the same ``tokenizer.json`` format the Qwen2 checkpoint ships.

Rules (ByteDance-Seed/Bagel `data/data_utils.py` `add_special_tokens`):
- ``encode`` adds no BOS/EOS; the plan builder adds ``<|im_start|>``/``<|im_end|>`` and the vision markers.
- The four special ids are looked up BY NAME in the tokenizer and must equal ``config.model.tokens``
  (a mismatch means the config and the checkpoint disagree: a clear error, never a silent remap).
- Raw text may not contain special-token strings (``<|...|>``): a literal ``<|vision_pad|>`` or ``<|im_end|>``
  inside a VQA answer would inject control tokens. Such samples raise ``BadSample("unknown_special_token")``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

from sgt_jax.data import synthetic, templates
from sgt_jax.data.records import BadSample

# role in config.model.tokens -> token string (Bagel: data/data_utils.py add_special_tokens)
SPECIAL_TOKENS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}
# Qwen2's pre-tokenisation regex (the "Split" step of Qwen2's tokenizer.json), used when a checkpoint
# folder ships only vocab.json + merges.txt.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_SPECIAL_LITERAL = re.compile(r"<\|[^|<>\s]{1,64}\|>")

# The tiny tokenizer's fixed layout: pad 0, the four special tokens at ids 1-4 (configs/bagel_sgt.py tiny
# model.tokens), unknown words -> UNK_ID, then words in sorted order.
TINY_PAD = "<|endoftext|>"
TINY_UNK = "<|unk|>"
UNK_ID = 5
# Words every tiny vocabulary holds, whatever the synthetic world's templates say (digits, punctuation,
# the usual question words), so small template edits do not shift many ids.
_BASE_WORDS = (
    list("0123456789") + list(".,;:!?'\"()-/+*=%#&")
    + "a an the is are was were of in on at to and or with without what which where how many much "
      "does do there this that these those image picture photo color colour colours colors shape shapes "
      "object objects yes no left right top bottom above below".split()
)


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token ids the plan builder needs.

    Attributes ``bos``, ``eos``, ``vision_start``, ``vision_end`` are ints (resolved by name).
    """

    def __init__(self, tok, *, expected_ids: dict | None = None, source: str = ""):
        self._tok = tok
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = {}
        for role, name in SPECIAL_TOKENS.items():
            tid = tok.token_to_id(name)
            if tid is None:
                raise ValueError(f"tokenizer {source!r} has no special token {name!r} (role {role})")
            ids[role] = tid
        if expected_ids is not None:
            bad = {r: (ids[r], int(expected_ids[r])) for r in SPECIAL_TOKENS if ids[r] != int(expected_ids[r])}
            if bad:
                detail = ", ".join(f"{r} {SPECIAL_TOKENS[r]}: tokenizer id {a} != config.model.tokens.{r}={b}"
                                   for r, (a, b) in bad.items())
                raise ValueError(f"special token ids of tokenizer {source!r} disagree with the config: {detail}")
        self.special_ids = ids
        self.bos, self.eos = ids["bos"], ids["eos"]
        self.vision_start, self.vision_end = ids["vision_start"], ids["vision_end"]
        self._added_ids = frozenset(tok.get_added_tokens_decoder().keys())

    def encode(self, text: str, *, where: str = "") -> list[int]:
        """Token ids of ``text`` with no BOS/EOS. Special-token literals in the text -> BadSample."""
        m = _SPECIAL_LITERAL.search(text)
        if m:
            raise BadSample("unknown_special_token", f"{where}: text contains {m.group(0)!r}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        leaked = [i for i in ids if i in self._added_ids]
        if leaked:  # an added token without the <|..|> form (checkpoint-specific); same rule
            raise BadSample("unknown_special_token", f"{where}: text encodes to added token ids {leaked[:4]}")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        return self._tok.to_str()

    def token_id(self, name: str) -> int | None:
        """The id of a (special) token by its string, or None if the tokenizer has no such token."""
        return self._tok.token_to_id(name)


def _from_vocab_merges(folder: str):
    """Qwen2 BPE from vocab.json + merges.txt (+ special tokens from tokenizer_config.json)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                         unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{folder}: vocab.json + merges.txt need tokenizer_config.json (added tokens)")
    with open(cfg_path) as f:
        added = json.load(f).get("added_tokens_decoder", {})
    for tid in sorted(added, key=int):
        entry = added[tid]
        got = tok.get_vocab_size(with_added_tokens=True)
        if int(tid) != got:
            raise ValueError(f"{cfg_path}: added token {entry['content']!r} has id {tid}, but the next free id "
                             f"is {got} (added tokens must be contiguous after the vocabulary)")
        tok.add_special_tokens([AddedToken(entry["content"], special=bool(entry.get("special", True)),
                                           normalized=False)])
    return tok


def load_tokenizer(path: str, expected_ids: dict | None = None) -> TextTokenizer:
    """Loads a tokenizer from a folder holding tokenizer.json, or vocab.json + merges.txt (Qwen2 layout).

    ``path`` may also name a tokenizer.json file directly.
    """
    from tokenizers import Tokenizer

    if os.path.isfile(path):
        tok = Tokenizer.from_file(path)
    elif os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    elif os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
        tok = _from_vocab_merges(path)
    else:
        raise FileNotFoundError(f"no tokenizer at {path!r}: expected tokenizer.json, or vocab.json + merges.txt")
    return TextTokenizer(tok, expected_ids=expected_ids, source=path)


def _words(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]


def build_tiny_tokenizer(corpus: Iterable[str], *, vocab_size: int = 512, save_to: str | None = None):
    """A word-level tokenizer over the words of ``corpus`` (plus a fixed base list), ids < ``vocab_size``.

    Layout: 0 ``<|endoftext|>`` (pad), 1 ``<|im_start|>``, 2 ``<|im_end|>``, 3 ``<|vision_start|>``,
    4 ``<|vision_end|>``, 5 unknown, then the sorted words. Lower-cases; splits on whitespace and punctuation
    (``\\w+|[^\\w\\s]+``). Returns the raw ``tokenizers.Tokenizer``; ``save_to`` writes it as tokenizer.json.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    specials = [TINY_PAD] + [SPECIAL_TOKENS[r] for r in ("bos", "eos", "vision_start", "vision_end")] + [TINY_UNK]
    words = set(_BASE_WORDS)
    for text in corpus:
        words.update(_words(text))
    words -= set(specials)
    ordered = sorted(words)
    if len(specials) + len(ordered) > vocab_size:
        raise ValueError(f"tiny vocabulary needs {len(specials) + len(ordered)} ids > vocab_size={vocab_size}")
    vocab = {tok: i for i, tok in enumerate(specials + ordered)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=TINY_UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials if s != TINY_UNK])
    if save_to:
        os.makedirs(save_to, exist_ok=True)
        tok.save(os.path.join(save_to, "tokenizer.json"))
    return tok


def synthetic_corpus() -> list[str]:
    """Every text the synthetic world and the instruction templates can produce (the tiny vocabulary)."""
    return [t for ts in templates.TEMPLATES.values() for t in ts] + list(synthetic.vocabulary())


def model_vocab_size(config) -> int:
    """The LM vocabulary of the run's model (BAGEL: model.llm; OmniGen2: the MLLM's text model)."""
    if str(config.model.family) == "omnigen2":
        return int(config.model.mllm.text.vocab_size)
    return int(config.model.llm.vocab_size)


def get_tokenizer(config) -> TextTokenizer:
    """The tokenizer named by ``config.data.tokenizer``, checked against ``config.model.tokens``.

    ``"synthetic"``: the tiny tokenizer built from :func:`synthetic_corpus` (through its JSON form, so the
    same loading code runs as for a checkpoint). Otherwise a folder/file for :func:`load_tokenizer`; empty
    means ``config.checkpoint.init_from`` (a BAGEL checkpoint folder ships the Qwen2 tokenizer files).
    """
    from tokenizers import Tokenizer

    expected = dict(config.model.tokens)
    spec = config.data.tokenizer
    if spec == "synthetic":
        raw = build_tiny_tokenizer(synthetic_corpus(), vocab_size=model_vocab_size(config))
        return TextTokenizer(Tokenizer.from_str(raw.to_str()), expected_ids=expected, source="synthetic")
    path = spec or config.checkpoint.init_from
    if not path:
        raise ValueError("config.data.tokenizer is empty and config.checkpoint.init_from names no folder: set "
                         "config.data.tokenizer to a folder with tokenizer.json (or vocab.json + merges.txt)")
    tt = load_tokenizer(path, expected_ids=expected)
    if tt.vocab_size > model_vocab_size(config):
        raise ValueError(f"tokenizer {path!r} has {tt.vocab_size} ids > the model's vocabulary "
                         f"{model_vocab_size(config)} (config.model.llm / config.model.mllm.text .vocab_size)")
    return tt
