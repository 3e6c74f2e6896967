"""OmniGen2 folder import/export: a tiny random folder in the released layout (tests/fixtures/
omnigen2_folder.py: sharded bf16 transformer/, diffusers vae/, scheduler/, a transformers-saved bf16
Qwen2.5-VL mllm/ in 3 shard files, processor/) -> sharded params -> folder, bit-identical tensor by tensor
(transformer/, vae/ and mllm/); the VAE through the FLUX VAE's diffusers-naming import; bad folders (a
broken mllm/config.json included) refused before any tensor is read.
"""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
pytest.importorskip("diffusers", reason="needs the [torch] extra")
pytest.importorskip("transformers", reason="needs the [torch] extra")

import jax  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sgt_jax.checkpoint import omnigen2_folder as og2  # noqa: E402
from sgt_jax.checkpoint import safetensors_io as sio  # noqa: E402
from sgt_jax.checkpoint.omnigen2_table import dit_table  # noqa: E402
from sgt_jax.checkpoint.table import expected_shapes, flatten_paths, state_dict_to_tree  # noqa: E402
from tests.fixtures.omnigen2_folder import DIT_CONFIG, dit_key_shapes, write_omnigen2_folder  # noqa: E402

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_omnigen2_folder(str(tmp_path_factory.mktemp("og2") / "src"), shards=2)


@pytest.fixture(scope="module")
def imported(folder):
    """One import of the fixture folder, shared by the tests that only read it."""
    return og2.import_folder(folder)


def _read_all(path):
    with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: v.dtype for k, v in sio.read_header(path).items()}


def _dir_tensors(d):
    tensors, dtypes = {}, {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            t, dt = _read_all(os.path.join(d, name))
            tensors.update({k: (name, v) for k, v in t.items()})
            dtypes.update(dt)
    return tensors, dtypes


def test_fixture_keys_match_table(folder):
    cfg = og2.open_folder(folder)[1]
    assert expected_shapes(dit_table(cfg)) == dit_key_shapes(DIT_CONFIG)


def _assert_same_tensors(src_dir, out_dir, index):
    """Same keys, shard file of each key, dtypes and bits; the same index weight map."""
    src, src_dtypes = _dir_tensors(src_dir)
    out, out_dtypes = _dir_tensors(out_dir)
    assert sorted(out) == sorted(src) and out_dtypes == src_dtypes
    for k, (fname, v) in src.items():
        assert out[k][0] == fname, k  # same shard file
        assert out[k][1].dtype == v.dtype and out[k][1].shape == v.shape and np.array_equal(out[k][1], v), k
    if index:
        assert json.load(open(os.path.join(out_dir, index)))["weight_map"] == \
            json.load(open(os.path.join(src_dir, index)))["weight_map"]


def test_import_export_round_trip_bit_identical(folder, imported, tmp_path):
    params, cfg_dit, cfg_vae, meta = imported
    # imported == the in-memory conversion of the same tensors
    src, src_dtypes = _dir_tensors(os.path.join(folder, "transformer"))
    want = state_dict_to_tree(dit_table(cfg_dit), {k: v[1] for k, v in src.items()})
    for path, arr in flatten_paths(want).items():
        got = params["dit"]
        for p in path:
            got = got[p]
        np.testing.assert_array_equal(np.asarray(got), arr)
    dest = og2.export_folder(params, cfg_dit, cfg_vae, str(tmp_path / "out"), meta)
    _assert_same_tensors(os.path.join(folder, "transformer"), os.path.join(dest, "transformer"),
                         "diffusion_pytorch_model.safetensors.index.json")
    assert json.load(open(os.path.join(dest, "transformer/config.json"))) == DIT_CONFIG
    vsrc, vsrc_dt = _dir_tensors(os.path.join(folder, "vae"))
    vout, vout_dt = _dir_tensors(os.path.join(dest, "vae"))
    assert sorted(vsrc) == sorted(vout) and vsrc_dt == vout_dt
    for k in vsrc:
        assert np.array_equal(vsrc[k][1], vout[k][1]), k
    # mllm/: through import_qwen2_5_vl / export_qwen2_5_vl, not copied: 3 bf16 shards + index as saved by transformers
    assert meta["mllm"]["layout"] == "legacy" and len(set(meta["mllm"]["files"].values())) == 3
    assert {tuple(sorted(params["mllm"]))} == {("language_model", "visual")}
    _assert_same_tensors(os.path.join(folder, "mllm"), os.path.join(dest, "mllm"), "model.safetensors.index.json")
    assert json.load(open(os.path.join(dest, "mllm/config.json"))) == json.load(open(os.path.join(folder, "mllm/config.json")))
    for sub in ("scheduler/scheduler_config.json", "mllm/generation_config.json", "processor/tokenizer.json",
                "model_index.json"):
        assert open(os.path.join(dest, sub), "rb").read() == open(os.path.join(folder, sub), "rb").read(), sub


def test_folder_meta_is_the_import_meta_without_reading(folder, imported, tmp_path):
    """A run started from the folder itself exports with ``folder_meta``: the same layout record as the
    import's, from headers only, and the export it drives is the same bit-identical folder."""
    params, cfg_dit, cfg_vae, meta = imported
    headers_only = og2.folder_meta(folder)
    want = {k: v for k, v in meta.items() if k != "import"}
    want["mllm"] = dict(want["mllm"], bytes_read=0)
    assert meta["mllm"]["bytes_read"] > 0 and headers_only == want
    dest = og2.export_folder(params, cfg_dit, cfg_vae, str(tmp_path / "out"), headers_only)
    _assert_same_tensors(os.path.join(folder, "transformer"), os.path.join(dest, "transformer"),
                         "diffusion_pytorch_model.safetensors.index.json")
    _assert_same_tensors(os.path.join(folder, "mllm"), os.path.join(dest, "mllm"), "model.safetensors.index.json")


def test_import_reads_the_mllm_headers_once(folder, monkeypatch):
    """The import checks mllm/ once (configs and safetensors headers) and reuses that check to read its
    tensors: the folder is opened once, not once for the layout record and again for the import."""
    from sgt_jax.checkpoint import qwen2_5_vl_folder as qwen_folder

    opened = []
    real = qwen_folder.open_folder
    monkeypatch.setattr(qwen_folder, "open_folder", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    og2.import_folder(folder)
    assert opened == [os.path.join(folder, "mllm")], opened


def test_vae_through_the_flux_vae_import(folder, imported):
    """vae/ (diffusers naming) lands in the FLUX VAE's tree exactly as the existing import converts the
    diffusers model's own state dict (whose posterior equals diffusers: tests/parity/test_flux_vae.py);
    the architecture, scale and shift come from vae/config.json."""
    from diffusers import AutoencoderKL

    from sgt_jax.checkpoint.vision_tables import vae_state_dict_to_params

    params, _, cfg_vae, _ = imported
    hf = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"))
    want = vae_state_dict_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, cfg_vae)
    got = flatten_paths(jax.tree.map(np.asarray, params["vae"]))
    assert sorted(got) == sorted(flatten_paths(want))
    for path, arr in flatten_paths(want).items():
        np.testing.assert_array_equal(got[path], arr)
    assert (cfg_vae.ch, tuple(cfg_vae.ch_mult), cfg_vae.num_res_blocks, cfg_vae.num_groups) == (16, (1, 2, 2), 1, 8)
    assert (cfg_vae.scale_factor, cfg_vae.shift_factor) == (0.3611, 0.1159)


def _no_reads(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(sio.SliceReader, "read", fail)


def _copy(folder, tmp_path):
    dst = str(tmp_path / "bad")
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("sub", ["transformer", "vae", "mllm", "scheduler"])
def test_missing_subfolder_refused(folder, tmp_path, monkeypatch, sub):
    bad = _copy(folder, tmp_path)
    shutil.rmtree(os.path.join(bad, sub))
    _no_reads(monkeypatch)
    with pytest.raises(og2.FolderError, match=f"missing subfolder: {sub}/"):
        og2.import_folder(bad)


def test_config_disagreeing_with_tensors_refused(folder, tmp_path, monkeypatch):
    bad = _copy(folder, tmp_path)
    cfg = dict(DIT_CONFIG, num_kv_heads=4, num_layers=3)
    json.dump(cfg, open(os.path.join(bad, "transformer/config.json"), "w"))
    vcfg = json.load(open(os.path.join(bad, "vae/config.json")))
    vcfg["latent_channels"] = 8
    json.dump(vcfg, open(os.path.join(bad, "vae/config.json"), "w"))
    _no_reads(monkeypatch)
    with pytest.raises(og2.FolderError) as err:
        og2.import_folder(bad)
    msg = str(err.value)
    assert "wrong shape in transformer/ (vs its config.json): layers.0.attn.to_k.weight is [24, 48], expected [48, 48]" in msg
    assert "missing in transformer/ (vs its config.json): layers.2.attn.to_q.weight" in msg
    assert "vae/config.json gives z_channels=8, the tensors have 16" in msg


def test_broken_mllm_config_refused(folder, tmp_path, monkeypatch):
    """mllm/config.json is checked with the other subfolders, before any tensor (of any subfolder) is read."""
    bad = _copy(folder, tmp_path)
    path = os.path.join(bad, "mllm/config.json")
    cfg = json.load(open(path))
    cfg["text_config"]["num_hidden_layers"] = 3
    del cfg["vision_config"]["depth"]
    json.dump(cfg, open(path, "w"))
    _no_reads(monkeypatch)
    with pytest.raises(og2.FolderError) as err:
        og2.import_folder(bad)
    assert "mllm/config.json: vision_config.'depth' missing or not an integer" in str(err.value)
    cfg["vision_config"]["depth"] = 2
    json.dump(cfg, open(path, "w"))
    with pytest.raises(og2.FolderError) as err:
        og2.import_folder(bad)
    assert "mllm/: missing in the safetensors: model.layers.2.self_attn.q_proj.weight" in str(err.value)
    open(path, "w").write("{not json")
    with pytest.raises(og2.FolderError, match="mllm/config.json is not valid JSON"):
        og2.import_folder(bad)


def test_cli_import_recognises_the_family(folder, tmp_path):
    from types import SimpleNamespace

    from sgt_jax.checkpoint import convert, store

    assert og2.is_omnigen2_folder(folder)
    work = str(tmp_path / "work")
    convert.run_import(None, SimpleNamespace(source=folder, workdir=work))
    meta = store.read_params_meta(work)
    assert meta["family"] == "omnigen2" and meta["mllm"]["layout"] == "legacy"
    convert.run_export(None, SimpleNamespace(workdir=work, dest=str(tmp_path / "out"), step=None, weights="ema"))
    # the restore target (abstract tree) includes the MLLM: mllm/ comes back from the Orbax params
    _assert_same_tensors(os.path.join(folder, "transformer"), str(tmp_path / "out" / "transformer"), None)
    _assert_same_tensors(os.path.join(folder, "mllm"), str(tmp_path / "out" / "mllm"), "model.safetensors.index.json")
