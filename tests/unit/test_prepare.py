"""--mode prepare: raw sources -> ArrayRecord shards + prepare_report.json; bad samples skipped by reason."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sgt_jax.data import latent_cache, prepare, sources
from sgt_jax.mode_args import ModeArgs
from sgt_jax.train import prepare_latents

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _enc(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def raw_root(tmp_path):
    """One root holding a SAM-SGT folder (3 good, 2 bad) and a LLaVA JSON array (2 good, 1 bad)."""
    root = tmp_path / "raw"
    (root / "sam_selection").mkdir(parents=True)
    (root / "sam_mask").mkdir()
    names = []
    for i in range(5):
        img = np.random.default_rng(i).integers(0, 256, (16, 20, 3), dtype=np.uint8)
        jb = _enc(img, "JPEG")
        if i == 3:
            jb = jb[: len(jb) // 3]  # truncated
        (root / "sam_selection" / f"s{i}.jpg").write_bytes(jb)
        if i != 4:  # s4 has no mask
            (root / "sam_mask" / f"s{i}.png").write_bytes(_enc(img[::-1].copy(), "PNG"))
        names.append(f"sam_selection/s{i}.jpg")
    (root / "list.txt").write_text("\n".join(names))
    (root / "images").mkdir()
    (root / "images" / "q.jpg").write_bytes(_enc(np.zeros((8, 8, 3), np.uint8), "JPEG"))
    conv = [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "dark"}]
    recs = [{"id": "v0", "image": "q.jpg", "conversations": conv},
            {"id": "v1", "image": None, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"id": "v2", "image": "q.jpg", "conversations": []}]
    (root / "vqa.json").write_text(json.dumps(recs))
    return root


def _config(tiny_config):
    cfg = tiny_config
    cfg.data.sources.seg.kind = "sam_sgt"
    cfg.data.sources.seg.list_file = "list.txt"
    cfg.data.sources.vqa.kind = "llava"
    cfg.data.sources.vqa.annotations = "vqa.json"
    cfg.data.sources.vqa.image_root = "images"
    cfg.data.sources.records_per_shard = 2
    cfg.data.latents = "online"
    return cfg


def test_prepare_report_and_readback(tiny_config, raw_root, tmp_path):
    cfg = _config(tiny_config)
    out = tmp_path / "prep"
    prepare_latents.run(cfg, ModeArgs(workdir=str(out), source=str(raw_root)))
    rep = json.loads((out / prepare.REPORT_NAME).read_text())
    seg, vqa = rep["families"]["seg"], rep["families"]["vqa"]
    assert (seg["read"], seg["written"], seg["skipped_total"]) == (5, 3, 2)
    assert {r: n for r, n in seg["skipped"].items() if n} == {"truncated_image": 1, "missing_mask": 1}
    assert seg["shards"] == ["seg-00000-of-00002.array_record", "seg-00001-of-00002.array_record"]
    assert (vqa["read"], vqa["written"]) == (3, 2) and vqa["skipped"]["empty_conversation"] == 1
    assert set(vqa["examples"]) == {"empty_conversation"}
    # read back through the config exactly as training would, equal to decoding the raw files
    cfg.data.sources.seg.kind = cfg.data.sources.vqa.kind = "prepared"
    cfg.data.sources.seg.root = cfg.data.sources.vqa.root = str(out)
    pseg, pvqa = sources.build_seg_source(cfg), sources.build_vqa_source(cfg)
    assert len(pseg) == 3 and len(pvqa) == 2
    raw_src = sources.SamSgtFolderSource(str(raw_root), "list.txt")
    direct = {}
    for i in range(3):
        s = raw_src.decode(raw_src[i])
        direct[s["key"]] = s
    for i in range(3):
        s = pseg.decode(pseg[i])
        np.testing.assert_array_equal(s["image"], direct[s["key"]]["image"])
        np.testing.assert_array_equal(s["target"], direct[s["key"]]["target"])
    assert sorted(pvqa.decode(pvqa[i])["key"] for i in range(2)) == ["v0", "v1"]
    # refuses to mix with an earlier run's shards
    with pytest.raises(FileExistsError):
        prepare.prepare(_config(tiny_config), str(out), str(raw_root))


def test_prepare_workers_same_output(tiny_config, tmp_path):
    """The thread-pool path writes the same records in the same order as the in-process path."""
    cfg = tiny_config
    cfg.data.sources.synthetic.num_samples = 6
    cfg.data.sources.vqa.kind = "none"
    cfg.data.latents = "online"
    prepare.prepare(cfg, str(tmp_path / "a"))
    cfg.data.sources.prepare_workers = 2
    prepare.prepare(cfg, str(tmp_path / "b"))
    a = (tmp_path / "a" / "seg-00000-of-00001.array_record").read_bytes()
    b = (tmp_path / "b" / "seg-00000-of-00001.array_record").read_bytes()
    assert a == b


def test_prepare_cli(tmp_path):
    """The real command line: exit code 0, report written."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "sgt_jax.main", "--mode", "prepare", "--config", "configs/sgt_tiny.py",
           "--config.data.sources.synthetic.num_samples=4", "--config.data.latents=online", "--workdir", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads((out / "prepare_report.json").read_text())
    assert rep["families"]["seg"]["written"] == 4 and rep["families"]["vqa"]["written"] == 4


def test_prepare_calls_latent_cache_when_cached(tiny_config, tmp_path, monkeypatch):
    """latents == "cached": the prepare mode hands the fresh shards and the VAE's encoder to cache_latents."""
    calls = []

    def fake(config, workdir, *, encode):
        calls.append(sorted(f for f in os.listdir(workdir) if f.endswith(".array_record")))
        assert encode == "encoder of the VAE"
        return {"written": 3}

    monkeypatch.setattr(latent_cache, "cache_latents", fake)
    monkeypatch.setattr(prepare_latents, "load_vae", lambda folder, cfg_vae: "VAE")
    monkeypatch.setattr(prepare_latents, "make_stats_encoder", lambda vae, p: f"encoder of the {vae}")
    cfg = tiny_config
    cfg.data.sources.synthetic.num_samples = 3
    cfg.data.sources.vqa.kind = "none"
    cfg.data.latents = "cached"
    rep = prepare_latents.prepare_all(cfg, str(tmp_path / "p"))
    assert calls == [["seg-00000-of-00001.array_record"]] and rep["latents"] == {"written": 3}
    assert json.loads((tmp_path / "p" / prepare.REPORT_NAME).read_text())["latents"] == {"written": 3}
