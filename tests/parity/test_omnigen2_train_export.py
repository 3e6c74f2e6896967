"""OmniGen2 folder -> --mode import -> 1 SGT training step from it (checkpoint.init_from) -> --mode export of
the training checkpoint -> a folder the importer validates and transformers / diffusers load; the trained
parts changed, the frozen VAE is bit-identical, and the exported DiT is the checkpoint's weights in bf16."""

import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
pytest.importorskip("diffusers", reason="needs the [torch] extra")
pytest.importorskip("transformers", reason="needs the [torch] extra")

from safetensors import safe_open  # noqa: E402

from sgt_jax.checkpoint import convert, store  # noqa: E402
from sgt_jax.checkpoint import omnigen2_folder as og2  # noqa: E402
from sgt_jax.configs_util import load_config  # noqa: E402
from sgt_jax.mode_args import ModeArgs  # noqa: E402
from sgt_jax.train import loop  # noqa: E402
from tests.fixtures.omnigen2_folder import write_omnigen2_folder  # noqa: E402
from tests.run_helpers import read_metrics  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.parity]
COMPUTE = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl", "attention_chunk")


def _config_for(folder: str, imported: str):
    """The tiny run config with the architecture of the imported folder (compute settings kept)."""
    c = load_config("configs/omnigen2_sgt.py:tiny")
    cfg_dit, cfg_vae, cfg_mllm = og2.configs_from_meta(store.read_params_meta(imported))
    c.model.dit.update({k: cfg_dit[k] for k in cfg_dit if k not in COMPUTE})
    c.model.vae = cfg_vae
    for k in ("text", "vision", "tokens"):
        c.model.mllm[k] = cfg_mllm[k]
    c.model.mllm.tokens.update(dict(pad=0, eos=2))  # the fixture tokenizer's ids (its config keeps Qwen's)
    c.checkpoint.init_from = imported
    c.data.tokenizer = os.path.join(folder, "processor")
    c.data.quota.update(dict(seg=1, vqa=0))  # the fixture's rotary tables hold 64 text positions
    # One row per device: in the whole suite the 8 fake CPU devices of the multidevice tests exist, and the
    # loop's mesh spans every device.
    c.data.packs_per_batch = jax.device_count()
    c.data.omnigen2.update(dict(text_tokens=64, target_max_side=32, target_max_pixels=32 * 32, target_multiple=8))
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save = 1, 1, False
    c.train.tensorboard = False
    c.optim.lr, c.optim.warmup_steps = 1e-3, 0
    return c


def _tensors(path):
    with safe_open(path, "np" if "vae" in path else "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_import_train_export_round_trip(tmp_path, monkeypatch):
    folder = write_omnigen2_folder(str(tmp_path / "src"))
    imported, run, out = str(tmp_path / "imported"), str(tmp_path / "run"), str(tmp_path / "out")
    convert.run_import(None, SimpleNamespace(source=folder, workdir=imported))
    config = _config_for(folder, imported)
    assert loop.run(config, ModeArgs(workdir=run)) == 0
    first = read_metrics(run)
    assert len(first) == 1 and first[0]["applied"] and np.isfinite(first[0]["loss"]), first
    convert.run_export(config, SimpleNamespace(workdir=run, dest=out, step=None, weights="ema"))

    og2.open_folder(out)  # the importer's checks: layout, configs vs tensors, every key and shape
    from diffusers import AutoencoderKL
    from transformers import Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(out, "mllm"))
    AutoencoderKL.from_pretrained(os.path.join(out, "vae"))

    vae = "vae/diffusion_pytorch_model.safetensors"
    src_vae, out_vae = _tensors(os.path.join(folder, vae)), _tensors(os.path.join(out, vae))
    assert sorted(src_vae) == sorted(out_vae) and all(np.array_equal(src_vae[k], out_vae[k]) for k in src_vae)
    dit = "transformer/diffusion_pytorch_model.safetensors"
    src_dit, out_dit = _tensors(os.path.join(folder, dit)), _tensors(os.path.join(out, dit))
    assert sorted(src_dit) == sorted(out_dit)
    changed = [k for k in src_dit if not torch.equal(src_dit[k], out_dit[k])]
    assert len(changed) > len(src_dit) // 2, changed  # one AdamW step moves (almost) every trained tensor
    # the exported x_embedder is the checkpoint's raw weight, transposed, in the source's dtype
    params = store.load_for_inference(run, weights="raw", abstract_params=og2.abstract_params(
        *og2.configs_from_meta(store.read_params_meta(imported)), None, ()))
    kernel = np.asarray(params["dit"]["x_embedder"]["kernel"], np.float32)
    want = torch.from_numpy(kernel.T.copy()).to(src_dit["x_embedder.weight"].dtype)
    assert torch.equal(out_dit["x_embedder.weight"], want)
    mllm_changed = any(not torch.equal(a, b) for a, b in zip(
        _mllm(folder).values(), _mllm(out).values()))
    assert mllm_changed  # the MLLM trains through the flow loss

    # A run started from the folder itself (checkpoint.init_from = the folder) exports in the folder's
    # layout, read from its headers: the same files as through the imported workdir. The run's recorded
    # init_from is pointed at the folder (one training run less in the suite).
    read = store.read_json_item

    def from_folder(workdir, step, item):
        out = read(workdir, step, item)
        if item == "config":
            out["checkpoint"]["init_from"] = folder
        return out

    monkeypatch.setattr(store, "read_json_item", from_folder)
    out2 = str(tmp_path / "out_from_folder")
    convert.run_export(config, SimpleNamespace(workdir=run, dest=out2, step=None, weights="ema"))
    for sub in (dit, vae):
        a, b = _tensors(os.path.join(out, sub)), _tensors(os.path.join(out2, sub))
        assert sorted(a) == sorted(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) if sub == vae
                                              else torch.equal(a[k], b[k]) for k in a), sub
    assert all(torch.equal(a, b) for a, b in zip(_mllm(out).values(), _mllm(out2).values()))
    monkeypatch.setattr(store, "read_json_item", lambda w, s, i: dict(read(w, s, i), checkpoint={"init_from": ""})
                        if i == "config" else read(w, s, i))
    with pytest.raises(ValueError, match="a run from random weights"):
        convert.run_export(config, SimpleNamespace(workdir=run, dest=str(tmp_path / "out3"), step=None,
                                                   weights="ema"))


def _mllm(root):
    out = {}
    d = os.path.join(root, "mllm")
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(d, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return dict(sorted(out.items()))
