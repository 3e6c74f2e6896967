"""Data defects that used to pass silently or lose good samples, each on a photo-like fixture: an EXIF-rotated
JPEG with its mask, a short SA-1B RLE, an empty annotation list, the COCO panoptic archive layout, a mask of
another size than its image, and prepare's exit status when a family writes nothing."""

import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sgt_jax.data import prepare, sources
from sgt_jax.data.records import BadSample
from sgt_jax.data.sources.sa1b import check_rle, rle_runs
from sgt_jax.mode_args import ModeArgs
from sgt_jax.train import prepare_latents


def _photo(h, w):
    """A smooth photo-like picture with a distinct top-left quadrant (so a rotation is visible)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([np.full((h, w), 60), x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1)], -1).astype(np.uint8)
    img[: h // 2, : w // 2] = (250, 30, 30)
    return img


def _jpeg(arr, orientation=None):
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if orientation is None:
        im.save(buf, format="JPEG", quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation  # Orientation
        im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _phone_jpeg(shown):
    """What a phone writes for the picture ``shown``: pixels stored rotated, EXIF Orientation=6."""
    stored = np.asarray(Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90))
    return _jpeg(stored, orientation=6)


def _mask_for(shown):
    """An instance colour map drawn for the displayed picture: the red quadrant is one instance."""
    m = np.zeros_like(shown)
    h, w = shown.shape[:2]
    m[: h // 2, : w // 2] = (0, 200, 255)
    return m


@pytest.mark.parametrize("hw", [(48, 32), (40, 40)])  # portrait (was skipped) and square (was misaligned)
def test_exif_rotated_sam_sgt_sample(tmp_path, tiny_config, hw):
    shown = _photo(*hw)
    root = tmp_path / "raw"
    (root / "sam_selection").mkdir(parents=True)
    (root / "sam_mask").mkdir()
    (root / "sam_selection" / "p.jpg").write_bytes(_phone_jpeg(shown))
    (root / "sam_mask" / "p.png").write_bytes(_png(_mask_for(shown)))
    (root / "list.txt").write_text("sam_selection/p.jpg\n")
    src = sources.SamSgtFolderSource(str(root), "list.txt")
    s = src.decode(src[0])
    assert s["image"].shape == shown.shape
    assert np.abs(s["image"].astype(int) - shown).mean() < 4  # as displayed, not as stored
    red = (s["image"][..., 0] > 200) & (s["image"][..., 1] < 80)
    assert (red == (s["target"] != 0).any(-1)).mean() > 0.97  # the mask lies on the object it outlines
    # prepare keeps the JPEG bytes; reading the shards back applies the same orientation
    cfg = tiny_config
    cfg.data.sources.seg.kind, cfg.data.sources.seg.list_file = "sam_sgt", "list.txt"
    cfg.data.sources.vqa.kind, cfg.data.latents = "none", "online"
    rep = prepare.prepare(cfg, str(tmp_path / "prep"), str(root))
    assert rep["families"]["seg"]["written"] == 1
    p = sources.PreparedSource(str(tmp_path / "prep"), "seg")
    np.testing.assert_array_equal(p.decode(p[0])["image"], s["image"])


def test_inference_inputs_are_read_as_displayed(tmp_path):
    from sgt_jax.sampling.cli import load_image

    shown = _photo(48, 32)
    (tmp_path / "p.jpg").write_bytes(_phone_jpeg(shown))
    assert load_image(str(tmp_path / "p.jpg")).shape == shown.shape


def _rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


def _runs(m):
    """COCO run lengths (column-major, starting with a run of zeros, possibly empty)."""
    flat = m.flatten(order="F")
    runs = [len(list(g)) for _, g in itertools.groupby(flat)]
    return [0] + runs if flat[0] else runs


def test_rle_runs_parses_pycocotools_strings():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((23, 31)) < rng.uniform(0.05, 0.95)
        assert rle_runs(_rle(m)["counts"].encode()).tolist() == _runs(m)
    # negative deltas and multi-character numbers (a 40x60 frame: runs over 31 need two characters)
    m = np.zeros((40, 60), bool)
    m[5:35, 10:50] = True
    m[::7, ::3] = False
    assert rle_runs(_rle(m)["counts"].encode()).tolist() == _runs(m)
    enc = mask_utils.frPyObjects({"size": [1, 9], "counts": [3, 2, 1, 3]}, 1, 9)["counts"]
    assert rle_runs(enc).tolist() == [3, 2, 1, 3]  # the third run is stored as -2 (1 - 3)
    with pytest.raises(ValueError, match="sum to 9"):
        check_rle([4, 5], 3, 4)
    with pytest.raises(ValueError, match="negative"):
        check_rle([14, -2], 3, 4)
    with pytest.raises(ValueError, match="ends inside"):
        rle_runs(b"1o")  # 'o' (111 - 48 = 63) says another character follows


def _sa1b(tmp_path, h, w, anns):
    (tmp_path / "sa_7.jpg").write_bytes(_jpeg(_photo(h, w)))
    (tmp_path / "sa_7.json").write_text(json.dumps({"image": {"height": h, "width": w}, "annotations": anns}))
    return sources.Sa1bSource(str(tmp_path))


def test_short_rle_is_refused_naming_the_annotation(tmp_path):
    h, w = 24, 36
    good = np.zeros((h, w), bool)
    good[3:12, 4:20] = True
    short = mask_utils.frPyObjects({"size": [h, w], "counts": [100, 50]}, h, w)  # covers 150 of 864 pixels
    assert mask_utils.decode(short).shape == (h, w)  # pycocotools accepts it without a word
    short = {"size": [h, w], "counts": short["counts"].decode()}
    src = _sa1b(tmp_path, h, w, [{"id": 11, "segmentation": _rle(good)}, {"id": 12, "segmentation": short}])
    with pytest.raises(BadSample) as e:
        src.decode(src[0])
    assert e.value.reason == "bad_annotation" and "annotation id 12" in e.value.detail and "sum to 150" in str(e.value)
    src = _sa1b(tmp_path, h, w, [{"id": 13, "segmentation": {"size": [h, w], "counts": [800, 10]}}])  # list form
    with pytest.raises(BadSample, match="annotation id 13"):
        src.decode(src[0])
    src = _sa1b(tmp_path, h, w, [{"id": 11, "segmentation": _rle(good)}])
    assert src.decode(src[0])["target"].any()


def test_empty_annotation_list_is_its_own_reason(tmp_path):
    src = _sa1b(tmp_path, 20, 30, [])
    with pytest.raises(BadSample) as e:
        src.decode(src[0])
    assert e.value.reason == "empty_annotations" and "sa_7" in e.value.detail


def _coco_archive(root, n=2, masks_in_annotations=False):
    """The layout of the official archives after unzipping: annotations/panoptic_train2017.json,
    train2017/*.jpg, panoptic_train2017/*.png (or annotations/panoptic_train2017/ when the inner zip is
    unzipped where it lies)."""
    h, w = 20, 28
    mask_dir = root / ("annotations/panoptic_train2017" if masks_in_annotations else "panoptic_train2017")
    mask_dir.mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        ids = np.zeros((h, w), np.int64)
        ids[:, : w // 2] = 1000 + i
        (root / "train2017" / f"{i:012d}.jpg").write_bytes(_jpeg(_photo(h, w)))
        pan = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        (mask_dir / f"{i:012d}.png").write_bytes(_png(pan))
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w})
        anns.append({"image_id": i, "file_name": f"{i:012d}.png",
                     "segments_info": [{"id": 1000 + i, "category_id": 1, "area": h * w // 2, "iscrowd": 0}]})
    (root / "annotations" / "panoptic_train2017.json").write_text(json.dumps({"images": images, "annotations": anns}))


@pytest.mark.parametrize("inner", [False, True])
def test_coco_panoptic_archive_layout_with_defaults(tmp_path, tiny_config, inner):
    root = tmp_path / "coco"
    _coco_archive(root, masks_in_annotations=inner)
    cfg = tiny_config
    cfg.data.sources.seg.kind, cfg.data.sources.vqa.kind, cfg.data.latents = "coco_panoptic", "none", "online"
    rep = prepare.prepare(cfg, str(tmp_path / "prep"), str(root))  # annotations, image_dir, mask_dir all ""
    assert (rep["families"]["seg"]["read"], rep["families"]["seg"]["written"]) == (2, 2)


def test_coco_panoptic_missing_mask_folder_and_empty_segments(tmp_path):
    root = tmp_path / "coco"
    _coco_archive(root)
    (root / "panoptic_train2017").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="panoptic_train2017.*mask_dir"):
        sources.CocoPanopticSource(str(root), "", "", "")
    doc = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
    doc["annotations"][0]["segments_info"] = []
    (root / "annotations" / "panoptic_train2017.json").write_text(json.dumps(doc))
    src = sources.CocoPanopticSource(str(root), "", "", "elsewhere")
    with pytest.raises(BadSample, match="empty_annotations"):
        src.decode(src[0])
    assert src.decode(src[1])["target"].any()


def test_mask_size_mismatch_policy(tmp_path):
    shown = _photo(40, 60)
    small = _mask_for(shown)[::2, ::2].copy()  # the mask saved at half size
    raw = {"task": "seg", "key": "k", "source": "t", "image": _jpeg(shown), "target": _png(small)}
    from sgt_jax.data.sources.common import decode_canonical

    with pytest.raises(BadSample, match="size_mismatch.*mask_size_mismatch='skip'"):
        decode_canonical(raw)
    t = decode_canonical(raw, mask_size_mismatch="resize_nearest")["target"]
    assert t.shape == shown.shape
    np.testing.assert_array_equal(t, np.asarray(Image.fromarray(small).resize((60, 40), Image.Resampling.NEAREST)))
    assert {tuple(c) for c in t.reshape(-1, 3)} == {(0, 0, 0), (0, 200, 255)}  # no blended colours
    # SA-1B: RLEs drawn at another size are rendered at theirs, then resized the same way
    from sgt_jax.data.sources.sa1b import render_rles

    m = np.zeros((20, 30), bool)
    m[5:15, 3:12] = True
    rles = [dict(_rle(m), counts=_rle(m)["counts"].encode())]
    with pytest.raises(BadSample, match="size_mismatch"):
        render_rles(rles, "k", 40, 60)
    big = render_rles(rles, "k", 40, 60, "resize_nearest")
    np.testing.assert_array_equal(big[::2, ::2], render_rles(rles, "k", 20, 30))


def test_mask_size_mismatch_config_value_is_checked(tiny_config):
    assert tiny_config.data.mask_size_mismatch == "skip"  # the default, stated in configs/bagel_sgt.py
    tiny_config.data.mask_size_mismatch = "bilinear"
    with pytest.raises(ValueError, match="config.data.mask_size_mismatch='bilinear'; choose one of"):
        sources.build_seg_source(tiny_config)


def test_prepare_fails_when_a_family_writes_nothing(tmp_path, tiny_config):
    root = tmp_path / "raw"
    (root / "sam_selection").mkdir(parents=True)
    for i in range(3):
        (root / "sam_selection" / f"s{i}.jpg").write_bytes(_jpeg(_photo(16, 16)))  # no sam_mask/ at all
    (root / "list.txt").write_text("\n".join(f"sam_selection/s{i}.jpg" for i in range(3)))
    cfg = tiny_config
    cfg.data.sources.seg.kind, cfg.data.sources.seg.list_file = "sam_sgt", "list.txt"
    cfg.data.sources.vqa.kind, cfg.data.latents = "none", "online"
    out = tmp_path / "prep"
    with pytest.raises(prepare.PrepareError) as e:
        prepare_latents.run(cfg, ModeArgs(workdir=str(out), source=str(root)))
    msg = str(e.value)
    assert "\n" not in msg and "seg (sam_sgt) wrote 0 of 3" in msg and "missing_mask 3" in msg
    rep = json.loads((out / prepare.REPORT_NAME).read_text())  # the report is written all the same
    assert rep["families"]["seg"]["skipped"]["missing_mask"] == 3
