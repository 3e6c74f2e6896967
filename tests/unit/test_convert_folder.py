"""Import/export of whole BAGEL folders through the CLI entry points (tiny random folder, 1 CPU device).

One folder is written, imported (``run_import``) and exported (``run_export``) per module; the tests
then check the round trip tensor by tensor, the inferred architecture, the metadata, the errors for bad
folders (raised before any tensor read), and that the restored parameters run in the model exactly
like parameters converted in memory.
"""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from sgt_jax.checkpoint import convert, folder as folder_lib, safetensors_io, store
from sgt_jax.checkpoint.table import ConversionError
from sgt_jax.configs_util import load_config
from sgt_jax.mode_args import ModeArgs
from sgt_jax.models.bagel import abstract_params
from tests.fixtures.compare import assert_same_safetensors
from tests.fixtures.bagel_folder import (BF16, ema_key_shapes, flux_ae_key_shapes, sincos_bf16, write_bagel_folder,
                                         write_random)


@pytest.fixture(scope="module")
def config():
    return load_config("configs/sgt_tiny.py")


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory, config):
    root = tmp_path_factory.mktemp("bagel")
    src, run, out = str(root / "src"), str(root / "run"), str(root / "out")
    write_bagel_folder(src, config.model, seed=7)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:  # an extra file export should carry
        json.dump({"model_max_length": 32768}, f)
    assert convert.run_import(config, ModeArgs(workdir=run, source=src)) == 0
    assert convert.run_export(None, ModeArgs(workdir=run, dest=out)) == 0
    return src, run, out


def test_import_copies_tokenizer_files_into_the_workdir(roundtrip):
    """An imported workdir doubles as the tokenizer folder when it is used as checkpoint.init_from."""
    src, run, _ = roundtrip
    with open(os.path.join(src, "tokenizer_config.json")) as a, open(os.path.join(run, "tokenizer_config.json")) as b:
        assert json.load(a) == json.load(b)


@pytest.mark.parametrize("name", ["ema.safetensors", "ae.safetensors"])
def test_cli_round_trip_is_bit_identical(roundtrip, name):
    src, _, out = roundtrip
    assert_same_safetensors(os.path.join(src, name), os.path.join(out, name))
    if name == "ema.safetensors":
        assert {v.dtype for v in safetensors_io.read_header(os.path.join(out, name)).values()} == {"BF16"}


def test_export_writes_official_configs_and_tables(roundtrip, config):
    src, _, out = roundtrip
    m = config.model
    for name in ("llm_config.json", "vit_config.json"):
        with open(os.path.join(src, name)) as f, open(os.path.join(out, name)) as g:
            assert json.load(f) == json.load(g)
    with open(os.path.join(out, "vit_config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == m.vit.num_layers + 1  # as the official folder lists
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    with safe_open(os.path.join(out, "ema.safetensors"), "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("latent_pos_embed.pos_embed").view(np.uint16),
                                      sincos_bf16(m.max_latent_size, m.llm.hidden_size).view(np.uint16))
        np.testing.assert_array_equal(f.get_tensor("vit_pos_embed.pos_embed").view(np.uint16),
                                      sincos_bf16(m.vit.max_patches_per_side, m.llm.hidden_size).view(np.uint16))


def test_meta_records_the_inferred_model(roundtrip, config):
    src, run, _ = roundtrip
    meta = store.read_params_meta(run)
    assert meta["format"] == convert.META_FORMAT
    assert meta["layout"]["scan_axis"] == 0
    assert "llm/layers/gen/q_proj/kernel" in meta["layout"]["stacked"]
    assert meta["source"]["ema_dtype"] == "BF16" and meta["source"]["vae_naming"] == "flux"
    assert folder_lib.architecture_diff(config.model, convert.model_config_from_meta(meta)) == []
    # every tensor byte was read once (replicated slices are not re-read)
    ema_bytes = sum(v.nbytes for v in safetensors_io.read_header(os.path.join(src, "ema.safetensors")).values())
    tables = sum(v.nbytes for k, v in safetensors_io.read_header(os.path.join(src, "ema.safetensors")).items()
                 if k.endswith("pos_embed.pos_embed"))
    assert meta["import"]["bytes_read_ema"] == ema_bytes - tables


def test_architecture_is_inferred_not_configured(roundtrip, config):
    """From the 7B config as base, the folder's own (tiny) dimensions come out."""
    src, _, _ = roundtrip
    big = load_config("configs/bagel_sgt.py:7b").model
    inferred = folder_lib.infer_model_config(folder_lib.open_folder(src), big)
    assert folder_lib.architecture_diff(config.model, inferred) == []
    assert inferred.vit.num_layers == config.model.vit.num_layers  # json lists one more


def _copy_folder(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):  # symlink the weights: cheap, and never written to
        s = os.path.join(src, name)
        if name.endswith(".safetensors"):
            os.symlink(s, os.path.join(dst, name))
        else:
            shutil.copy(s, dst)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a tensor was read before the folder was validated")

    monkeypatch.setattr(safetensors_io.SliceReader, "read", fail)


def test_config_header_disagreement_is_refused_before_reading(roundtrip, config, tmp_path, no_tensor_reads):
    src, _, _ = roundtrip
    bad = str(tmp_path / "bad")
    _copy_folder(src, bad)
    m = config.model
    for name, changes in (("llm_config.json", {"intermediate_size": m.llm.intermediate_size + 1,
                                               "num_hidden_layers": m.llm.num_layers + 1}),
                          ("vit_config.json", {"num_hidden_layers": m.vit.num_layers + 2, "patch_size": 7})):
        with open(os.path.join(bad, name)) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(os.path.join(bad, name), "w") as f:
            json.dump(cfg, f)
    with pytest.raises(folder_lib.FolderError) as err:
        convert.run_import(config, ModeArgs(workdir=str(tmp_path / "run"), source=bad))
    msg = str(err.value)
    assert "mlp.gate_proj.weight has shape [128, 64], the configs imply [129, 64]" in msg
    assert f"num_hidden_layers={m.llm.num_layers + 1}, ema.safetensors holds {m.llm.num_layers} LLM layers" in msg
    assert f"so BAGEL builds {m.vit.num_layers + 1} ViT layers, but ema.safetensors holds {m.vit.num_layers}" in msg
    assert "patch_embedding.weight has shape [32, 588], the configs imply [32, 147]" in msg
    assert not os.path.exists(tmp_path / "run" / "params")


def test_bad_keys_in_the_file_are_all_named_before_reading(config, tmp_path, no_tensor_reads):
    m = config.model
    shapes = ema_key_shapes(m)
    del shapes["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"]
    shapes["connector.fc2.bias"] = (3,)
    shapes["language_model.model.layers.0.self_attn.extra.weight"] = (2, 2)
    src = str(tmp_path / "src")
    write_bagel_folder(src, m)
    write_random(os.path.join(src, "ema.safetensors"), shapes, BF16, 0)
    ae = flux_ae_key_shapes(m.vae)
    del ae["decoder.conv_out.bias"]
    write_random(os.path.join(src, "ae.safetensors"), ae, np.float32, 0)
    with pytest.raises(folder_lib.FolderError) as err:
        convert.import_folder(src, config, progress=False)
    msg = str(err.value)
    assert "missing in ema.safetensors: language_model.model.layers.1.mlp_moe_gen.up_proj.weight" in msg
    assert "unexpected in ema.safetensors: language_model.model.layers.0.self_attn.extra.weight" in msg
    assert "wrong shape in ema.safetensors: connector.fc2.bias is [3], expected [64]" in msg
    assert "decoder.conv_out.bias" in msg


def test_missing_files_are_named(tmp_path):
    with pytest.raises(folder_lib.FolderError, match="missing file: llm_config.json"):
        folder_lib.open_folder(str(tmp_path))


def test_restored_import_runs_like_the_state_dict(roundtrip, config):
    """params restored from the workdir equal in-memory conversion bit for bit, and put into a Bagel
    they compute exactly the same numbers (one jitted function, applied to both trees)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sgt_jax.checkpoint.table import flatten_paths
    from sgt_jax.models.bagel import Bagel
    from sgt_jax.parallel.mesh import logical_rules, make_mesh

    src, run, _ = roundtrip
    m = config.model
    restored = store.load_params(run, abstract_params(m, mesh=make_mesh(config.mesh), rules=logical_rules(config)))
    with safe_open(os.path.join(src, "ema.safetensors"), "numpy") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(os.path.join(src, "ae.safetensors"), "numpy") as f:
        ae = {k: f.get_tensor(k) for k in f.keys()}
    direct = convert.bagel_state_dict_to_params(sd, m)
    direct["vae"] = convert.vae_state_dict_to_params(ae, m.vae)
    a, b = flatten_paths(restored), flatten_paths(direct)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == np.float32, k
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Bagel(m, rngs=nnx.Rngs(0)))
    graphdef, template = nnx.split(abstract)

    @jax.jit
    def run_model(params):
        state = jax.tree.map(lambda x: x, template)
        state.replace_by_pure_dict(params)
        model = nnx.merge(graphdef, state)
        logits = model.lm_logits(model.llm.embed(jnp.arange(6, dtype=jnp.int32)[None] % m.llm.vocab_size))
        g = m.vit.max_patches_per_side
        patches = jnp.linspace(-1, 1, 4 * 3 * m.vit.patch_size ** 2).reshape(1, 4, -1)
        vit = model.embed_vit(patches, jnp.array([[0, 1, g, g + 1]]), jnp.zeros((1, 4), jnp.int32))
        lat = model.embed_latents(jnp.ones((1, 2, model.patch_latent_dim)), jnp.array([[0.3, 0.7]]),
                                  jnp.array([[0, 1]]))
        return logits, vit, lat

    # same placement for both (restored arrays carry the mesh's shardings; with 8 fake devices in the
    # session a sharded matmul may sum in another order)
    dev = jax.devices()[0]
    outs = [run_model(jax.tree.map(lambda a: jax.device_put(np.asarray(a), dev), p)) for p in (restored, direct)]
    for x, y in zip(*outs):
        assert np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).max() > 0
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_in_memory_errors_are_conversion_errors(config):
    with pytest.raises(ConversionError, match="missing in state dict"):
        convert.bagel_state_dict_to_params({}, config.model)
    assert issubclass(folder_lib.FolderError, ConversionError)
    assert BF16 == np.dtype(ml_dtypes.bfloat16)
