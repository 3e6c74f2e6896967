"""Data sources on tiny on-disk fixtures built here: SAM-SGT (folder + tar), SA-1B, COCO panoptic, LLaVA VQA,
prepared ArrayRecord shards, and the config factory."""

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sgt_jax.data import records, render, sources
from sgt_jax.data.prepare import prepare_family
from sgt_jax.data.sources.sam_sgt import mask_path_for


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _enc(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pil_decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def sam_tree(tmp_path):
    """<tmp>/jpg_root/sam_selection/{a,b.x}.jpg + sam_mask/{a,b.x}.png (a 'jpg' in the folder name on purpose)."""
    root = tmp_path / "jpg_root"
    (root / "sam_selection").mkdir(parents=True)
    (root / "sam_mask").mkdir()
    files = {}
    for i, name in enumerate(["a", "b.x"]):
        img, mask = _rgb(24, 32, i), _rgb(24, 32, 10 + i)
        jb, pb = _enc(img, "JPEG"), _enc(mask, "PNG")
        (root / "sam_selection" / f"{name}.jpg").write_bytes(jb)
        (root / "sam_mask" / f"{name}.png").write_bytes(pb)
        files[name] = (jb, pb, mask)
    lst = root / "list.txt"
    lst.write_text(f"sam_selection/a.jpg\n\n# comment\n{root}/sam_selection/b.x.jpg\n")
    return root, files


def test_mask_path_rule():
    assert mask_path_for("/d/jpgs/sam_selection/sa_1.jpg") == "/d/jpgs/sam_mask/sa_1.png"
    assert mask_path_for("/d/sam_selection/x.jpg.jpg") == "/d/sam_mask/x.jpg.png"
    assert mask_path_for("/d/other/sa_1.jpg") is None


def test_sam_folder_and_tar_agree(sam_tree, tmp_path):
    root, files = sam_tree
    src = sources.SamSgtFolderSource(str(root), "list.txt")
    assert len(src) == 2
    got = {}
    for i in range(len(src)):
        s = src.decode(src[i])
        got[s["key"]] = s
        jb, pb, mask = files[s["key"]]
        np.testing.assert_array_equal(s["image"], _pil_decode(jb))
        np.testing.assert_array_equal(s["target"], mask)
        assert s["task"] == "seg" and s["source"] == "sam_sgt"
    assert set(got) == {"a", "b.x"}
    # the same samples from tar shards (two shards, members in subfolders, plus a stray file)
    shards = tmp_path / "tars"
    shards.mkdir()
    for k, name in enumerate(["a", "b.x"]):
        with tarfile.open(shards / f"sam_selection-{k:05d}.tar", "w") as tf:
            for arc, data in ((f"sam_selection/{name}.jpg", files[name][0]), (f"sam_mask/{name}.png", files[name][1]),
                              ("README.txt", b"hello")):
                ti = tarfile.TarInfo(arc)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    tsrc = sources.SamSgtTarSource(str(shards))
    assert len(tsrc) == 2
    tsrc = pickle.loads(pickle.dumps(tsrc))  # Grain workers receive a pickled copy
    for i in range(2):
        s = tsrc.decode(tsrc[i])
        np.testing.assert_array_equal(s["image"], got[s["key"]]["image"])
        np.testing.assert_array_equal(s["target"], got[s["key"]]["target"])
    with pytest.raises(IndexError):
        tsrc[2]


def test_sam_proxy_and_subset(sam_tree):
    root, files = sam_tree
    src = sources.SamSgtFolderSource(str(root), "list.txt", proxy_task="edge")
    s = src.decode(src[0])
    assert s["task"] == "edge" and set(np.unique(s["target"])) <= {0, 255}
    sub = sources.SamSgtFolderSource(str(root), "list.txt", max_samples=1, seed=3)
    assert len(sub) == 1 and sub[0]["key"] in files
    with pytest.raises(FileNotFoundError, match="list_file"):
        sources.SamSgtFolderSource(str(root), "nope.txt")


def _sa1b_fixture(tmp_path, h=20, w=30):
    rng = np.random.default_rng(0)
    masks = []
    for k in range(5):
        m = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        m[y0:y0 + rng.integers(3, h - y0 + 1), x0:x0 + rng.integers(3, w - x0 + 1)] = 1
        masks.append(m)
    masks.append(np.ones((h, w), np.uint8) * 0)  # an empty mask (area 0)
    anns = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "area": 0})
    img = _rgb(h, w, 5)
    (tmp_path / "sa_1.jpg").write_bytes(_enc(img, "JPEG"))
    (tmp_path / "sa_1.json").write_text(json.dumps({"image": {"height": h, "width": w}, "annotations": anns}))
    return masks


def test_sa1b_render(tmp_path):
    masks = _sa1b_fixture(tmp_path)
    src = sources.Sa1bSource(str(tmp_path))
    s = src.decode(src[0])
    # expected: independent painter, descending area with stable ties, palette of the key, black elsewhere
    areas = [int(m.sum()) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: (-areas[i], i))
    pal = render.palette("sa_1", len(masks))
    exp = np.zeros(masks[0].shape + (3,), np.uint8)
    for rank, i in enumerate(order):
        exp[masks[i].astype(bool)] = pal[rank]
    np.testing.assert_array_equal(s["target"], exp)
    assert s["key"] == "sa_1" and s["source"] == "sa1b"
    # canonical (what prepare stores) decodes to the same sample
    from sgt_jax.data.sources.common import decode_canonical

    c = decode_canonical(src.canonical(src[0]))
    np.testing.assert_array_equal(c["target"], exp)
    np.testing.assert_array_equal(c["image"], s["image"])


def test_sa1b_uncompressed_rle(tmp_path):
    m = np.zeros((6, 7), np.uint8)
    m[1:4, 2:6] = 1
    counts, flat, cur, run = [], m.flatten(order="F"), 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    (tmp_path / "sa_2.jpg").write_bytes(_enc(_rgb(6, 7, 1), "JPEG"))
    (tmp_path / "sa_2.json").write_text(json.dumps({"annotations": [{"segmentation": {"size": [6, 7], "counts": counts}}]}))
    src = sources.Sa1bSource(str(tmp_path))
    t = src.decode(src[0])["target"]
    assert ((t != 0).any(-1) == m.astype(bool)).all()


def test_coco_panoptic(tmp_path):
    h, w = 10, 12
    ids = np.zeros((h, w), np.int64)
    ids[:5, :] = 3 + 256 * 1  # id 259: 60 px
    ids[5:, :6] = 70000  # 30 px
    ids[5:, 6:8] = 12  # not listed in segments_info -> black
    png = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], -1).astype(np.uint8)
    (tmp_path / "train2017").mkdir()
    (tmp_path / "pan").mkdir()
    (tmp_path / "train2017" / "000001.jpg").write_bytes(_enc(_rgb(h, w, 2), "JPEG"))
    (tmp_path / "pan" / "000001.png").write_bytes(_enc(png, "PNG"))
    ann = {"images": [{"id": 1, "file_name": "000001.jpg"}],
           "annotations": [{"image_id": 1, "file_name": "000001.png",
                            "segments_info": [{"id": 70000, "area": 30}, {"id": 259, "area": 60}]}]}
    (tmp_path / "pan.json").write_text(json.dumps(ann))
    src = sources.CocoPanopticSource(str(tmp_path), "pan.json", "train2017", "pan")
    s = src.decode(src[0])
    pal = render.palette("000001", 2)
    assert (s["target"][:5] == pal[0]).all()  # larger segment first colour
    assert (s["target"][5:, :6] == pal[1]).all()
    assert (s["target"][5:, 6:] == 0).all()


def _llava_fixture(tmp_path, fmt):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for n in ("a", "b"):
        (tmp_path / "images" / "sub" / f"{n}.jpg").write_bytes(_enc(_rgb(8, 9, ord(n)), "JPEG"))
    recs = [
        {"id": "one", "image": "sub/a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                               {"from": "gpt", "value": "That."}]},
        {"id": "two", "image": ["sub/a.jpg", "sub/b.jpg"], "conversations": [
            {"from": "user", "value": "<image><image> compare"}, {"from": "assistant", "value": "Same."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "three", "image": None, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"conversations": [{"from": "human", "value": "no image key"}, {"from": "gpt", "value": "Ok."}]},
    ]
    path = tmp_path / f"ann.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(recs, indent=1))
    else:
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava(tmp_path, fmt):
    path = _llava_fixture(tmp_path, fmt)
    src = sources.LlavaVqaSource(str(path), str(tmp_path / "images"))
    assert len(src) == 4
    out = [src.decode(src[i]) for i in range(4)]
    assert [len(o["images"]) for o in out] == [1, 2, 0, 0]
    assert out[0]["key"] == "one" and out[3]["key"].endswith(":3")
    assert [t["from"] for t in out[1]["turns"]] == ["human", "gpt", "human", "gpt"]
    np.testing.assert_array_equal(out[1]["images"][1], _pil_decode((tmp_path / "images/sub/b.jpg").read_bytes()))
    for o in out:
        assert records.validate(o) is o


def test_prepared_roundtrip_and_grain(sam_tree, tmp_path):
    import grain
    root, _ = sam_tree
    src = sources.SamSgtFolderSource(str(root), "list.txt")
    rep = prepare_family(src, str(tmp_path / "prep"), "seg", "segmentation", records_per_shard=1, progress=False)
    assert rep["read"] == rep["written"] == 2 and rep["shards"] == ["seg-00000-of-00002.array_record",
                                                                     "seg-00001-of-00002.array_record"]
    psrc = sources.PreparedSource(str(tmp_path / "prep"), "seg", proxy_task="reconstruction")
    ds = grain.MapDataset.source(psrc).map(psrc.decode)
    direct = {s["key"]: s for s in (src.decode(src[i]) for i in range(2))}
    for s in ds:
        assert s["task"] == "recon"
        np.testing.assert_array_equal(s["image"], direct[s["key"]]["image"])
        np.testing.assert_array_equal(s["target"], direct[s["key"]]["image"])
    seg = sources.PreparedSource(str(tmp_path / "prep"), "seg")
    seg.decode(seg[1])  # opens a reader; the pickled copy (a Grain worker) must open its own
    seg = pickle.loads(pickle.dumps(seg))
    for i in range(2):
        s = seg.decode(seg[i])
        np.testing.assert_array_equal(s["target"], direct[s["key"]]["target"])
    os.remove(tmp_path / "prep" / "seg-00001-of-00002.array_record")
    with pytest.raises(ValueError, match="incomplete"):
        sources.PreparedSource(str(tmp_path / "prep"), "seg")


def test_build_from_config(tiny_config, sam_tree):
    root, _ = sam_tree
    cfg = tiny_config
    seg, vqa = sources.build_seg_source(cfg), sources.build_vqa_source(cfg)
    assert len(seg) == cfg.data.sources.synthetic.num_samples
    a, b = seg.decode(seg[1]), vqa.decode(vqa[1])
    np.testing.assert_array_equal(a["image"], b["images"][0])  # same scene for the same index
    cfg.data.proxy_task = "inpainting"
    inp = sources.build_seg_source(cfg).decode(seg[1])
    assert inp["task"] == "inpaint"
    np.testing.assert_array_equal(inp["target"], a["image"])
    assert not np.array_equal(inp["image"], a["image"])
    cfg.data.proxy_task = "segmentation"
    cfg.data.sources.seg.kind = "sam_sgt"
    cfg.data.sources.seg.list_file = "list.txt"
    assert len(sources.build_seg_source(cfg, root_override=str(root))) == 2
    cfg.data.sources.seg.kind = "nope"
    with pytest.raises(ValueError, match="sources.seg.kind"):
        sources.build_seg_source(cfg)
    cfg.data.sources.vqa.kind = "none"
    assert sources.build_vqa_source(cfg) is None
    cfg.data.proxy_task = "depth"
    cfg.data.sources.seg.kind = "synthetic"
    with pytest.raises(ValueError, match="proxy_task"):
        sources.build_seg_source(cfg)
