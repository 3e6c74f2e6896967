"""Word categories for the attention-on-words analysis (the paper, Fig. 8b).

The paper groups prompt words into Object / Color / Position / Others but ships no mapping. Ours:
  * ``color``: the GenEval colour words plus common variants;
  * ``position``: spatial relation words (GenEval's "position" prompts use "left of", "right of",
    "above", "below"), plus generic spatial prepositions;
  * ``object``: every word of the 80 COCO class names (GenEval's objects are COCO classes), plus the
    synthetic world's shape names and a few generic nouns;
  * ``others``: everything else (articles, numbers, verbs, "photo", ...).
Words are lower-cased and stripped of punctuation; a trailing plural "s"/"es" is removed when the
stem is in a list. A JSON file ``{"object": [...], "color": [...], "position": [...]}`` replaces the
lists (config.analysis.lexicon).
"""

from __future__ import annotations

import json
import string

CATEGORIES = ("object", "color", "position", "others")

COLOR_WORDS = ("red orange yellow green blue purple pink brown black white gray grey cyan magenta violet "
               "gold silver beige navy teal").split()
POSITION_WORDS = ("left right above below top bottom under over behind front beside next near between "
                  "on in inside outside upon beneath underneath atop center middle").split()
COCO_CLASSES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign "
    "parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis "
    "racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot dog "
    "pizza donut cake chair couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell "
    "phone microwave oven toaster sink refrigerator book clock vase scissors teddy bear hair drier "
    "toothbrush").split()
# "orange" is both a COCO fruit and a colour: it counts as a colour (GenEval prompts use it as one far
# more often), so it is removed from the objects.
OBJECT_WORDS = tuple(sorted((set(COCO_CLASSES) | {"circle", "square", "triangle", "shape", "object", "man",
                                                  "woman", "people", "animal"}) - {"orange"}))


class Lexicon:
    def __init__(self, object_words=OBJECT_WORDS, color_words=COLOR_WORDS, position_words=POSITION_WORDS):
        self.sets = {"object": set(object_words), "color": set(color_words), "position": set(position_words)}

    @classmethod
    def from_file(cls, path: str) -> "Lexicon":
        with open(path) as f:
            d = json.load(f)
        missing = [k for k in ("object", "color", "position") if k not in d]
        if missing:
            raise ValueError(f"lexicon {path!r} lacks the list(s) {missing}")
        return cls(d["object"], d["color"], d["position"])

    def category(self, word: str) -> str:
        w = word.lower().strip(string.punctuation + " ")
        cands = [w] + ([w[:-2]] if w.endswith("es") else []) + ([w[:-1]] if w.endswith("s") else [])
        for cat in ("color", "position", "object"):
            if any(c in self.sets[cat] for c in cands):
                return cat
        return "others"


def load_lexicon(path: str = "") -> Lexicon:
    return Lexicon.from_file(path) if path else Lexicon()
