"""--mode prepare: raw sources -> ArrayRecord shards + prepare_report.json; bad samples skipped by reason."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sgt_jax.data import prepare, sources
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
    # shard k = the good records among input records [2k, 2k+2): s3 and s4 are bad, so the last shard is empty
    assert seg["shards"] == [f"seg-0000{k}-of-00003.array_record" for k in range(3)]
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


def _random_vae_folder(cfg, folder):
    """``folder``/ae.safetensors with a random tiny VAE (N(0, 0.1) weights from numpy)."""
    import jax
    from flax import nnx
    from safetensors.numpy import save_file

    from sgt_jax.checkpoint.convert import params_to_vae_state_dict
    from sgt_jax.models.flux_vae import FluxVAE

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: FluxVAE(cfg.model.vae, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    os.makedirs(folder, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in params_to_vae_state_dict(params, cfg.model.vae).items()},
              os.path.join(folder, "ae.safetensors"))


def _outputs(folder):
    """Every output file's bytes (the per-shard part files aside) and the report without run-dependent fields."""
    files = {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))
             if ".part-" not in f and f != prepare.REPORT_NAME}
    rep = json.loads((folder / prepare.REPORT_NAME).read_text())
    for fam in rep["families"].values():
        fam.pop("seconds")
    for k in ("workdir", "shards"):
        rep.pop(k)
    return files, rep


@pytest.mark.slow
def test_two_shards_then_merge_equal_one_process(tiny_config, raw_root, tmp_path):
    """prepare.shard=0/2 and 1/2 (separate machines) + the merge -> the same shards, latent cache (VAE
    statistics), index and report counts as one process; "merge" alone rebuilds the same report and index."""
    cfg = _config(tiny_config)
    cfg.data.latents = "cached"
    _random_vae_folder(cfg, str(tmp_path / "bagel"))
    cfg.checkpoint.init_from = str(tmp_path / "bagel")
    one, two = tmp_path / "one", tmp_path / "two"
    prepare_latents.prepare_all(cfg, str(one), str(raw_root))
    cfg.prepare.shard = "0/2"
    part = prepare_latents.prepare_all(cfg, str(two), str(raw_root))
    assert part["shard"] == [0, 2] and not (two / prepare.REPORT_NAME).exists()  # 1/2 has not run yet
    assert sorted(part["families"]["seg"]["blocks"]) == ["0", "2"]  # records 0-1 and 4 (s4 has no mask)
    assert (part["families"]["seg"]["read"], part["families"]["seg"]["written"]) == (3, 2)  # this shard's counts
    cfg.prepare.shard = "1/2"
    prepare_latents.prepare_all(cfg, str(two), str(raw_root))  # finds both parts: merges
    files_one, rep_one = _outputs(one)
    files_two, rep_two = _outputs(two)
    assert sorted(files_one) == sorted(files_two)
    assert {"latents_index.json", "latents-00000-of-00003.array_record", "seg-00002-of-00003.array_record",
            "vqa-00001-of-00002.array_record"} <= set(files_one)
    for name in files_one:
        assert files_one[name] == files_two[name], name
    assert rep_one == rep_two and rep_one["latents"]["written"] == 3
    assert rep_one["families"]["seg"]["written"] == 3 and rep_one["families"]["seg"]["skipped_total"] == 2
    # the merge alone, from the parts
    for name in (prepare.REPORT_NAME, "latents_index.json"):
        os.remove(two / name)
    cfg.prepare.shard = "merge"
    prepare.prepare(cfg, str(two))
    assert _outputs(two) == (files_one, rep_one)
    cfg.prepare.shard = "2/2"
    with pytest.raises(ValueError, match="0 <= i < n"):
        prepare.prepare(cfg, str(tmp_path / "bad"), str(raw_root))
