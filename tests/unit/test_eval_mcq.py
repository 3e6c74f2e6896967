"""MCQ runner: answer extraction rules, accuracy bookkeeping, file formats, GenEval folder layout."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from sgt_jax.eval import geneval, mcq


@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("(B) the dog", "B"), ("B. left", "B"), ("b", "B"), ("C:", "C"),
    ("The answer is (C).", "C"), ("I think the answer is A because...", "A"), ("Option B", "B"),
    ("It is clearly (A), not the others", "A"), ("left", "A"), ("The object on the right.", "B"),
    ("E", None), ("I don't know", None), ("left or right", None), ("A dog is on the left", "A"), ("A cat is to the right", "B"),
])
def test_extract_choice(text, want):
    assert mcq.extract_choice(text, ["left", "right", "above"]) == want


def test_answer_letter_forms():
    assert mcq.answer_letter("(B)", ["x", "y"]) == "B"
    assert mcq.answer_letter("y", ["x", "y"]) == "B"
    with pytest.raises(ValueError, match="neither"):
        mcq.answer_letter("(D)", ["x", "y"])


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _write_bench(tmp_path, fmt):
    rows = []
    for i in range(6):
        rows.append(dict(idx=i, task="Count" if i < 4 else "Depth", source="COCO" if i % 2 else "ADE20K",
                         question=f"q{i}", choices=["red", "green", "blue"], answer=f"({'ABC'[i % 3]})",
                         image=_png(("red", "green", "blue")[i % 3])))
    if fmt == "jsonl":
        (tmp_path / "imgs").mkdir()
        path = tmp_path / "bench.jsonl"
        with open(path, "w") as f:
            for r in rows:
                name = f"imgs/{r['idx']}.png"
                (tmp_path / name).write_bytes(r["image"])
                f.write(json.dumps(dict(r, image=name)) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "bench.parquet"
        pq.write_table(pa.Table.from_pylist([dict(r, image={"bytes": r["image"], "path": None}) for r in rows]),
                       path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_run_mcq_bookkeeping(tmp_path, fmt):
    path = _write_bench(tmp_path, fmt)
    qs = mcq.load_benchmark(path)
    assert [q["answer"] for q in qs] == ["A", "B", "C", "A", "B", "C"]

    def answer_fn(image, prompt):  # sees the real image: answers by its colour, wrong on q4
        assert "(A) red\n(B) green\n(C) blue\n" + mcq.DEFAULT_SUFFIX in prompt
        colour = np.asarray(image)[0, 0].argmax()
        if prompt.startswith("q4"):
            return "no idea"
        return ["(A)", "The answer is B", "blue"][colour]

    res = mcq.run_mcq(qs, answer_fn, str(tmp_path / "out"), progress=False)
    assert res["n"] == 6 and res["unparsed"] == 1
    assert res["overall"] == pytest.approx(5 / 6)
    assert res["per_task"]["Count"]["accuracy"] == 1.0
    assert res["per_task"]["Depth"]["accuracy"] == 0.5
    assert res["macro"] == pytest.approx(0.75)
    assert res["per_source"]["ADE20K"]["accuracy"] == pytest.approx(2 / 3)
    preds = [json.loads(l) for l in open(tmp_path / "out" / "mcq_predictions.jsonl")]
    assert len(preds) == 6 and preds[4]["pred"] is None and preds[1]["pred"] == "B"
    assert os.path.exists(tmp_path / "out" / "mcq_scores.csv")


def test_cvbench_headline():
    preds = [dict(task="t", source=s, pred=p, answer="A")
             for s, p in [("ADE20K", "A"), ("ADE20K", "B"), ("COCO", "A"), ("Omni3D", "B")]]
    res = mcq.score(preds)
    assert res["cvbench"]["2d"] == pytest.approx(0.75) and res["cvbench"]["overall"] == pytest.approx(0.375)


def test_benchmark_errors(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps(dict(question="q", choices=["a", "b"], answer="A")) + "\n")
    with pytest.raises(ValueError, match="missing column"):
        mcq.load_benchmark(str(p))
    with pytest.raises(FileNotFoundError):
        mcq.load_benchmark(str(tmp_path / "nope"))


def test_geneval_layout(tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"}]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    def gen(prompt, seed):
        seen.append((prompt, seed))
        return Image.new("RGB", (16, 16), (seed % 255, 0, 0)), {"steps": 2}

    out = tmp_path / "gen"
    res = geneval.run_geneval(str(meta), str(out), gen, n_per_prompt=2, seed=7, progress=False)
    assert res["images_written"] == 4
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == rows[1]
    assert (out / "00001" / "samples" / "0001.png").exists()
    assert seen[3] == ("a red dog", 7 + 1000 + 1)
    again = geneval.run_geneval(str(meta), str(out), gen, n_per_prompt=2, seed=7, progress=False)
    assert again["images_written"] == 0 and again["prompts_skipped"] == 2


def test_benchmark_images_are_read_as_displayed(tmp_path):
    """A phone JPEG (pixels stored sideways, EXIF Orientation=6) is shown upright to the model, from a path
    or from embedded bytes; a corrupt image is refused naming it."""
    shown = np.zeros((32, 48, 3), np.uint8)
    shown[:16, :24] = (250, 30, 30)  # red top-left quadrant of the displayed picture
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "phone.jpg").write_bytes(buf.getvalue())
    for value in ("phone.jpg", {"bytes": buf.getvalue()}):
        got = np.asarray(mcq.image_of(dict(image=value, base_dir=str(tmp_path))))
        assert got.shape == shown.shape
        assert got[4, 4, 0] > 200 and got[4, 4, 1] < 80  # red where the viewer sees red
        assert got[-4, -4].max() < 60
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg.*not a readable image"):
        mcq.image_of(dict(image="bad.jpg", base_dir=str(tmp_path)))
