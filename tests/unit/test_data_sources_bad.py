"""Bad data: every kind is rejected with its own reason, counted, never a crash or a silently wrong sample."""

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from sgt_jax.data import records, sources
from sgt_jax.data.bad_data import SkipCounter
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.common import decode_canonical, decode_rgb


def _enc(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


IMG = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
JPG, PNG = _enc(IMG, "JPEG"), _enc(IMG, "PNG")


@pytest.mark.parametrize("data,reason", [
    (JPG[: len(JPG) // 2], "truncated_image"),
    (PNG[: len(PNG) // 2], "truncated_image"),
    (b"", "truncated_image"),
    (b"\xff\xd8" + bytes(200) + b"\xff\xd9", "corrupt_image"),  # bad header, intact end marker
    (b"\x89PNG\r\n\x1a\n" + b"garbage" * 30 + b"IEND", "corrupt_image"),
    (b"not an image at all", "corrupt_image"),
    (None, "missing_image"),
])
def test_image_decode_reasons(data, reason):
    with pytest.raises(BadSample) as e:
        decode_rgb(data, "image", "k")
    assert e.value.reason == reason


def test_truncated_refused_even_if_pil_allows(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadSample, match="truncated_image"):
        decode_rgb(JPG[: len(JPG) // 2], "image", "k")
    assert decode_rgb(JPG, "image", "k").shape == (40, 48, 3)


def test_rgba_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red, rest fully transparent
    out = decode_rgb(_enc(rgba, "PNG"), "image", "k")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)


def _seg_raw(image=JPG, target=PNG):
    return {"task": "seg", "key": "k", "source": "t", "image": image, "target": target}


def test_seg_reasons():
    assert decode_canonical(_seg_raw())["target"].shape == (40, 48, 3)
    cases = [(_seg_raw(target=None), "missing_mask"),
             (_seg_raw(target=_enc(IMG[:, :40], "PNG")), "size_mismatch"),
             (_seg_raw(target=PNG[:100]), "truncated_image"),
             (_seg_raw(image=None), "missing_image"),
             ({"task": "seg"}, "missing_image"),
             ({"task": "depth"}, "bad_record")]
    for raw, reason in cases:
        with pytest.raises(BadSample) as e:
            decode_canonical(raw)
        assert e.value.reason == reason, (raw.keys(), e.value)
    # other proxy tasks do not need the mask
    assert decode_canonical(_seg_raw(target=None), "reconstruction")["task"] == "recon"


def _vqa_raw(turns, images=(JPG,)):
    return {"task": "vqa", "key": "k", "source": "t", "images": list(images), "turns": turns}


def test_vqa_reasons():
    good = [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]
    assert decode_canonical(_vqa_raw(good))["images"][0].shape == (40, 48, 3)
    cases = [(_vqa_raw([]), "empty_conversation"),
             (_vqa_raw([{"from": "human", "value": "<image> q"}]), "empty_conversation"),
             (_vqa_raw([good[0], {"from": "gpt", "value": "  "}]), "empty_conversation"),
             (_vqa_raw(good, images=()), "image_count_mismatch"),
             (_vqa_raw(good, images=(JPG, JPG)), "image_count_mismatch"),
             (_vqa_raw(good, images=(None,)), "missing_image"),
             (_vqa_raw([{"from": "system", "value": "x"}] + good), "bad_record"),
             (_vqa_raw(None), "bad_record")]
    for raw, reason in cases:
        with pytest.raises(BadSample) as e:
            decode_canonical(raw)
        assert e.value.reason == reason, (raw["turns"], e.value)


def test_validate_rejects_wrong_types():
    for bad in [{"task": "seg", "key": "k", "source": "s", "image": IMG.astype(np.float32), "target": IMG},
                {"task": "seg", "key": "", "source": "s", "image": IMG, "target": IMG},
                {"task": "seg", "key": "k", "source": "s", "image": IMG[..., :1], "target": IMG[..., :1]}, "x"]:
        with pytest.raises(BadSample, match="bad_record"):
            records.validate(bad)
    with pytest.raises(ValueError, match="not one of"):
        BadSample("made_up_reason")


def test_sources_count_bad_files(tmp_path):
    """A SAM folder and an LLaVA file with one bad sample of each kind: the counter sees every reason once."""
    root = tmp_path / "sam"
    (root / "sam_selection").mkdir(parents=True)
    (root / "sam_mask").mkdir()
    files = {"ok": (JPG, PNG), "trunc": (JPG[:300], PNG), "corrupt": (b"\xff\xd8garbage\xff\xd9", PNG),
             "nomask": (JPG, None), "small": (JPG, _enc(IMG[:20], "PNG"))}
    for name, (jb, pb) in files.items():
        (root / "sam_selection" / f"{name}.jpg").write_bytes(jb)
        if pb is not None:
            (root / "sam_mask" / f"{name}.png").write_bytes(pb)
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "x.jpg").write_bytes(JPG)  # not in a sam_selection folder: no mask can be located
    lines = [f"sam_selection/{n}.jpg" for n in files] + ["sam_selection/gone.jpg", "elsewhere/x.jpg"]
    (root / "list.txt").write_text("\n".join(lines))
    src = sources.SamSgtFolderSource(str(root), "list.txt")
    c = SkipCounter(log_skips=False)
    out = [c.call(src.decode, src[i]) for i in range(len(src))]  # src[i] never raises
    assert sum(o is not None for o in out) == 1
    d = c.as_dict()
    assert d["seen"] == 7 and d["ok"] == 1
    want = {"truncated_image": 1, "corrupt_image": 1, "missing_mask": 2, "size_mismatch": 1, "missing_image": 1}
    assert {r: n for r, n in d["skipped"].items() if n} == want

    vqa = tmp_path / "v.jsonl"
    (tmp_path / "im.jpg").write_bytes(JPG)
    recs = [{"image": "im.jpg", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
            {"image": "im.jpg", "conversations": []},
            {"image": "im.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"image": 5, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    vqa.write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    v = sources.LlavaVqaSource(str(vqa), str(tmp_path))
    c2 = SkipCounter(log_skips=False)
    res = [c2.call(v.decode, v[i]) for i in range(len(v))]
    assert sum(r is not None for r in res) == 1
    assert {r: n for r, n in c2.as_dict()["skipped"].items() if n} == \
        {"empty_conversation": 1, "image_count_mismatch": 1, "bad_record": 2}
    c.merge(c2)
    assert c.as_dict()["seen"] == 12 and c.total_skipped == 10


def test_sa1b_bad_annotations(tmp_path):
    (tmp_path / "sa_1.jpg").write_bytes(JPG)
    (tmp_path / "sa_1.json").write_text("{broken")
    (tmp_path / "sa_2.jpg").write_bytes(JPG)
    (tmp_path / "sa_2.json").write_text(json.dumps({"annotations": [{"segmentation": {"size": [10, 10], "counts": [100]}}]}))
    (tmp_path / "sa_3.jpg").write_bytes(JPG)  # no json
    src = sources.Sa1bSource(str(tmp_path))
    reasons = []
    for i in range(3):
        with pytest.raises(BadSample) as e:
            src.decode(src[i])
        reasons.append(e.value.reason)
    assert reasons == ["bad_annotation", "size_mismatch", "missing_mask"]
