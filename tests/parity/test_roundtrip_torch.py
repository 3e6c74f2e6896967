"""Folders made or read by PyTorch tooling: a diffusers-named VAE, and what the exported folder looks like
to torch / transformers.

* A BAGEL folder whose ``ae.safetensors`` is a diffusers ``AutoencoderKL`` state dict (FLUX structure,
  tiny) is imported through ``run_import``: the VAE dimensions are inferred from the diffusers names, and
  the restored VAE's posterior equals diffusers' own ``encode`` (fp32, max abs diff <= 1e-4).
* ``run_export`` writes FLUX naming (fp32, as read); converting it back gives bit-identical VAE parameters.
* The exported ``ema.safetensors`` loads with ``safetensors.torch`` as bf16 with the exact key set, and
  the JSON configs load as transformers ``Qwen2Config`` / ``SiglipVisionConfig`` with our dimensions.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
diffusers = pytest.importorskip("diffusers", reason="needs the [torch] extra")
transformers = pytest.importorskip("transformers", reason="needs the [torch] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.checkpoint import convert, store  # noqa: E402
from sgt_jax.checkpoint.table import flatten_paths  # noqa: E402
from sgt_jax.configs_util import load_config  # noqa: E402
from sgt_jax.mode_args import ModeArgs  # noqa: E402
from sgt_jax.models.bagel import abstract_params  # noqa: E402
from sgt_jax.parallel.mesh import logical_rules, make_mesh  # noqa: E402
from tests.fixtures.bagel_folder import ema_key_shapes, flux_ae_key_shapes, write_bagel_folder  # noqa: E402
from tests.parity.torch_models import random_diffusers_vae  # noqa: E402

ATOL = 1e-4


def test_diffusers_vae_folder_imports_and_exports(tmp_path):
    config = load_config("configs/sgt_tiny.py")
    m = config.model
    hf = random_diffusers_vae(m.vae, seed=3, norm_jitter=0.1, with_factors=False)
    ae = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert any(".down_blocks." in k for k in ae)
    src, run, out = (str(tmp_path / n) for n in ("src", "run", "out"))
    write_bagel_folder(src, m, seed=5, ae_tensors=ae)

    convert.run_import(config, ModeArgs(workdir=run, source=src))
    meta = store.read_params_meta(run)
    assert meta["source"]["vae_naming"] == "diffusers"
    assert tuple(meta["model"]["vae"]["ch_mult"]) == tuple(m.vae.ch_mult)
    params = store.load_params(run, abstract_params(m, mesh=make_mesh(config.mesh), rules=logical_rules(config)))

    from sgt_jax.models.flux_vae import FluxVAE

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: FluxVAE(m.vae, rngs=nnx.Rngs(0)))
    graphdef, template = nnx.split(abstract)

    @jax.jit
    def encode(p, x):
        state = jax.tree.map(lambda a: a, template)
        state.replace_by_pure_dict(p)
        return nnx.merge(graphdef, state).encode_stats(x)

    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 24, 3)).astype(np.float32)
    mean, logvar = encode(params["vae"], jnp.asarray(x))
    with torch.no_grad():
        post = hf.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    for name, got, ref in (("mean", mean, post.mean), ("logvar", logvar, post.logvar)):
        ref = ref.permute(0, 2, 3, 1).numpy()
        assert np.abs(ref).max() > 0.05 and np.abs(ref).max() < 20
        err = np.abs(np.asarray(got) - ref).max()
        assert err <= ATOL, f"posterior {name}: max abs diff {err:.2e} > {ATOL}"

    convert.run_export(None, ModeArgs(workdir=run, dest=out))
    from safetensors.torch import load_file

    ae_out = load_file(os.path.join(out, "ae.safetensors"))
    assert {k: tuple(v.shape) for k, v in ae_out.items()} == flux_ae_key_shapes(m.vae)
    assert {v.dtype for v in ae_out.values()} == {torch.float32}
    again = convert.vae_state_dict_to_params({k: v.numpy() for k, v in ae_out.items()}, m.vae)
    a, b = flatten_paths(params["vae"]), flatten_paths(again)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))

    ema = load_file(os.path.join(out, "ema.safetensors"))
    assert {k: tuple(v.shape) for k, v in ema.items()} == ema_key_shapes(m)
    assert {v.dtype for v in ema.values()} == {torch.bfloat16}
    qwen = transformers.Qwen2Config.from_json_file(os.path.join(out, "llm_config.json"))
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.num_attention_heads, qwen.num_key_value_heads,
            qwen.intermediate_size, qwen.vocab_size) == (m.llm.hidden_size, m.llm.num_layers, m.llm.num_heads,
                                                        m.llm.num_kv_heads, m.llm.intermediate_size,
                                                        m.llm.vocab_size)
    assert qwen.tie_word_embeddings is False
    vit = transformers.SiglipVisionConfig.from_json_file(os.path.join(out, "vit_config.json"))
    assert (vit.hidden_size, vit.num_hidden_layers, vit.patch_size, vit.image_size // vit.patch_size) == (
        m.vit.hidden_size, m.vit.num_layers + 1, m.vit.patch_size, m.vit.max_patches_per_side)
