"""VQA data in LLaVA(-OneVision) form (song2yu/SGT `BAGEL/data/vlm_dataset.py`): a JSON array (what ``download_ov.py`` writes,
``all_data.json``) or JSONL (one object per line, what the BAGEL trainer reads); the format is detected from
the first non-blank character ('[' = array).

Each record: ``{"id"?, "image": "rel/path.jpg" | ["a.jpg", "b.jpg"] | null | absent, "conversations":
[{"from": "human" | "gpt", "value": "... <image> ..."}, ...]}``. Image paths are absolute or relative to
``image_root``. Records without images are text-only samples. Roles "user"/"assistant" are accepted as
aliases of "human"/"gpt"; any other role (e.g. "system") is ``bad_record``. The number of ``<image>`` markers
must equal the number of images (else ``image_count_mismatch``: we do not guess where a missing marker goes).

The index keeps byte offsets for JSONL (records are parsed lazily) and one compact JSON string per record
for arrays, so workers do not hold parsed Python objects for half a million conversations.
"""

from __future__ import annotations

import json
import os

from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.base import Source
from sgt_jax.data.sources.common import load_json, read_bytes

ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class LlavaVqaSource(Source):
    name = "llava"
    family = "vqa"

    def __init__(self, annotations: str, image_root: str = "", root: str = "", **kw):
        super().__init__(**kw)
        self.path = annotations if os.path.isabs(annotations) or not root else os.path.join(root, annotations)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"llava: annotations {self.path!r} (config.data.sources.vqa.annotations) "
                                    "does not exist")
        self.image_root = image_root if os.path.isabs(image_root) or not root else os.path.join(root, image_root)
        with open(self.path, "rb") as f:
            head = f.read(4096).lstrip()
        self.is_array = head[:1] == b"["
        self.lines: list[bytes] = []  # array: one compact JSON per record
        self.offsets: list[int] = []  # JSONL: byte offset of each non-blank line
        if self.is_array:
            doc = load_json(self.path, "llava annotations")
            self.lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() for r in doc]
        else:
            with open(self.path, "rb") as f:
                pos = 0
                for line in f:
                    if line.strip():
                        self.offsets.append(pos)
                    pos += len(line)
        if not len(self):
            raise ValueError(f"llava: {self.path!r} has no records")
        self._finish_init()

    def _num_items(self) -> int:
        return len(self.lines) if self.is_array else len(self.offsets)

    def _get(self, j: int) -> dict:
        if self.is_array:
            rec = self.lines[j]
        else:
            with open(self.path, "rb") as f:
                f.seek(self.offsets[j])
                rec = f.readline()
        return {"key": f"{os.path.basename(self.path)}:{j}", "record": rec}

    def canonical(self, raw: dict) -> dict:
        """Parses the record and reads its image files -> canonical VQA record (may raise BadSample)."""
        key = raw["key"]
        try:
            text = raw["record"].decode("utf-8")  # explicit: json.loads(bytes) guesses UTF-16/32 for garbage
        except UnicodeDecodeError as err:
            raise BadSample("bad_record", f"{key}: not UTF-8 (byte offset {err.start} in the record)") from None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadSample("bad_record", f"{key}: invalid JSON: {err.msg} at column {err.colno}") from None
        if not isinstance(rec, dict):
            raise BadSample("bad_record", f"{key}: record is a {type(rec).__name__}, not an object")
        if rec.get("id") not in (None, ""):
            key = str(rec["id"])
        conv = rec.get("conversations")
        if not conv:
            raise BadSample("empty_conversation", f"{key}: no conversations")
        if not isinstance(conv, list):
            raise BadSample("bad_record", f"{key}: conversations must be a list")
        turns = []
        for i, t in enumerate(conv):
            role = ROLE_ALIASES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise BadSample("bad_record", f"{key}: turn {i} is not {{from: human|gpt, value: str}}: {t!r:.100}")
            turns.append({"from": role, "value": t["value"]})
        image = rec.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise BadSample("bad_record", f"{key}: 'image' must be a path, a list of paths or null, got {image!r:.100}")
        images = [read_bytes(p if os.path.isabs(p) else os.path.join(self.image_root, p)) for p in paths]
        return {"task": "vqa", "key": key, "source": self.name, "images": images, "turns": turns}
