"""Multiple-choice benchmarks from local files in the CV-Bench layout (song2yu/SGT `BAGEL/eval/`).

Input: a parquet file, a JSONL file, or a folder of them (all read, sorted by name). One row per question
with the columns
  image     PNG/JPEG bytes, a ``{"bytes": ..., "path": ...}`` dict (the Hugging Face parquet layout), or a
            path (relative paths are resolved against the benchmark file's folder)
  question  the question text
  choices   the list of answer options (in order: option 0 is letter A)
  answer    the correct option: a letter ("A", "(A)") or the option text itself
  task      the task name used for per-task accuracy (optional: "all")
Optional columns kept in the predictions: ``idx``/``id``, ``source`` (CV-Bench's ADE20K/COCO/Omni3D).

The prompt is built the same way for every benchmark (one protocol, recorded in the predictions):
  ``<question>\n(A) <choice 0>\n(B) <choice 1>...\n<suffix>`` with the MMVP/LLaVA suffix
  "Answer with the option's letter from the given choices directly." (config.evaluate.mcq_suffix).

Answer extraction (``extract_choice``) from the model's free text, first rule that fires wins:
  1. the text is a single option letter (any case), or starts with a bracketed letter or a capital
     letter followed by ``.``, ``)``, ``:`` or ``,`` (``"(B) the cat"``, ``"B. left"``); a capital
     followed by a space is not taken ("A dog is..." uses the article "A");
  2. "answer is X" / "answer: X" / "option X" anywhere (the last occurrence);
  3. exactly one bracketed letter ``(X)`` anywhere in the text;
  4. the text equals one option's text (case- and punctuation-insensitive), or contains exactly one
     option's text as a whole phrase;
  otherwise no choice (counted wrong, reported as ``unparsed``). Letters beyond the number of options
  never count.

Scores: accuracy per task, per source (if the column exists), ``overall`` = micro accuracy over all
questions and ``macro`` = mean of the per-task accuracies. CV-Bench's own headline ((2D_ADE + 2D_COCO)/2
averaged with 3D) is also given when the ``source`` column has those values.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import string
from typing import Callable, Iterable

from PIL import Image

from sgt_jax.extras import require

LETTERS = string.ascii_uppercase
DEFAULT_SUFFIX = "Answer with the option's letter from the given choices directly."


def _read_table(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        return require("pyarrow.parquet", "data").read_table(path).to_pylist()
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"benchmark file {path!r} must be .parquet or .jsonl")


def _load_image(value, base_dir: str) -> Image.Image:
    """A benchmark image as displayed: decoded as the data pipeline decodes (EXIF orientation applied,
    transparency on white); a missing or unreadable image raises naming it."""
    from sgt_jax.data.records import BadSample
    from sgt_jax.data.sources.common import decode_rgb

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        data, what = bytes(value), "embedded benchmark image"
    elif isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        if not os.path.exists(path):
            raise FileNotFoundError(f"benchmark image {path!r} does not exist")
        with open(path, "rb") as f:
            data, what = f.read(), f"benchmark image {path!r}"
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__} (bytes, dict or path)")
    try:
        return Image.fromarray(decode_rgb(data, what, what))
    except BadSample as err:
        raise ValueError(f"{what}: not a readable image ({err.reason})") from None


def answer_letter(answer, choices: list[str]) -> str:
    """The correct option as a letter, from "A", "(A)" or the option's text."""
    a = str(answer).strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?", a)
    if m and LETTERS.index(m.group(1).upper()) < len(choices):
        return m.group(1).upper()
    for i, c in enumerate(choices):
        if _norm(c) == _norm(a):
            return LETTERS[i]
    raise ValueError(f"answer {answer!r} is neither an option letter nor one of the choices {choices}")


def load_benchmark(path: str) -> list[dict]:
    """Read a benchmark file or folder into a list of questions (image loaded lazily by ``image_of``)."""
    files = sorted(glob.glob(os.path.join(path, "*.parquet")) + glob.glob(os.path.join(path, "*.jsonl"))) \
        if os.path.isdir(path) else [path]
    if not files or not all(os.path.exists(f) for f in files):
        raise FileNotFoundError(f"no benchmark .parquet/.jsonl found at {path!r}")
    out = []
    for f in files:
        for i, row in enumerate(_read_table(f)):
            missing = [k for k in ("image", "question", "choices", "answer") if k not in row]
            if missing:
                raise ValueError(f"{f} row {i}: missing column(s) {missing}")
            choices = [str(c) for c in row["choices"]]
            if not 2 <= len(choices) <= len(LETTERS):
                raise ValueError(f"{f} row {i}: needs 2..26 choices, got {len(choices)}")
            out.append(dict(id=row.get("idx", row.get("id", f"{os.path.basename(f)}:{i}")),
                            task=str(row.get("task") or "all"), source=row.get("source"),
                            question=str(row["question"]), choices=choices,
                            answer=answer_letter(row["answer"], choices),
                            image=row["image"], base_dir=os.path.dirname(os.path.abspath(f))))
    return out


def image_of(q: dict) -> Image.Image:
    return _load_image(q["image"], q["base_dir"])


def format_prompt(question: str, choices: list[str], suffix: str = DEFAULT_SUFFIX) -> str:
    lines = [question.strip()] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    if suffix:
        lines.append(suffix)
    return "\n".join(lines)


def _norm(s: str) -> str:
    return " ".join(s.lower().translate(str.maketrans("", "", string.punctuation)).split())


def extract_choice(text: str, choices: list[str]) -> str | None:
    """The option letter the model chose, by the rules of the module docstring, or None."""
    n = len(choices)
    valid = LETTERS[:n]
    t = text.strip()
    if len(t) == 1 and t.upper() in valid:
        return t.upper()
    m = re.match(r"^(?:\(([A-Z])\)|([A-Z])(?:[.):,]|$))", t)
    if m and (m.group(1) or m.group(2)) in valid:
        return m.group(1) or m.group(2)
    hits = re.findall(r"(?:answer\s*(?:is|:)|option)\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])", t, flags=re.I)
    hits = [h.upper() for h in hits if h.upper() in valid]
    if hits:
        return hits[-1]
    bracketed = {b for b in re.findall(r"\(([A-Z])\)", t) if b in valid}
    if len(bracketed) == 1:
        return bracketed.pop()
    nt = _norm(t)
    for i, c in enumerate(choices):
        if nt == _norm(c):
            return LETTERS[i]
    contained = [i for i, c in enumerate(choices) if _norm(c) and re.search(rf"\b{re.escape(_norm(c))}\b", nt)]
    if len(contained) == 1:
        return LETTERS[contained[0]]
    return None


def score(predictions: Iterable[dict]) -> dict:
    """Accuracy per task / source, micro ``overall``, ``macro`` over tasks, and CV-Bench's headline."""
    per_task = collections.defaultdict(list)
    per_source = collections.defaultdict(list)
    allc = []
    unparsed = 0
    for p in predictions:
        ok = p["pred"] == p["answer"]
        per_task[p["task"]].append(ok)
        if p.get("source") is not None:
            per_source[str(p["source"])].append(ok)
        allc.append(ok)
        unparsed += p["pred"] is None
    acc = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    result = {
        "n": len(allc), "overall": acc(allc), "unparsed": unparsed,
        "per_task": {k: {"n": len(v), "accuracy": acc(v)} for k, v in sorted(per_task.items())},
        "macro": acc([acc(v) for v in per_task.values()]) if per_task else 0.0,
    }
    if per_source:
        result["per_source"] = {k: {"n": len(v), "accuracy": acc(v)} for k, v in sorted(per_source.items())}
        if {"ADE20K", "COCO", "Omni3D"} <= set(per_source):
            two_d = (acc(per_source["ADE20K"]) + acc(per_source["COCO"])) / 2
            result["cvbench"] = {"2d": two_d, "3d": acc(per_source["Omni3D"]),
                                 "overall": (two_d + acc(per_source["Omni3D"])) / 2}
    return result


def run_mcq(questions: list[dict], answer_fn: Callable[[Image.Image, str], str], out_dir: str,
            suffix: str = DEFAULT_SUFFIX, progress: bool = True) -> dict:
    """Ask every question through ``answer_fn(image, prompt) -> text``; save predictions and scores.

    Writes ``<out_dir>/mcq_predictions.jsonl``, ``mcq_scores.json`` and ``mcq_scores.csv``."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    preds = []
    with open(os.path.join(out_dir, "mcq_predictions.jsonl"), "w") as f:
        for q in tqdm(questions, desc="mcq", disable=not progress):
            prompt = format_prompt(q["question"], q["choices"], suffix)
            text = answer_fn(image_of(q), prompt)
            p = dict(id=q["id"], task=q["task"], source=q["source"], prompt=prompt, output=text,
                     pred=extract_choice(text, q["choices"]), answer=q["answer"])
            p["correct"] = p["pred"] == p["answer"]
            preds.append(p)
            f.write(json.dumps(p, default=str) + "\n")
    result = score(preds)
    with open(os.path.join(out_dir, "mcq_scores.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "mcq_scores.csv"), "w") as f:
        f.write("group,name,n,accuracy\n")
        f.write(f"all,overall,{result['n']},{result['overall']:.6f}\n")
        for k, v in result["per_task"].items():
            f.write(f"task,{k},{v['n']},{v['accuracy']:.6f}\n")
        for k, v in result.get("per_source", {}).items():
            f.write(f"source,{k},{v['n']},{v['accuracy']:.6f}\n")
    return result
