"""Cached latent statistics vs online encoding: the same posterior for the same target (canvas rule documented
in sgt_jax/data/latent_cache.py), and the pipeline's cached batches carry them in the latent rows."""

import json
import os

import numpy as np
import pytest

from flax import nnx as flax_nnx

from sgt_jax.data.latent_cache import INDEX_NAME, LatentCache, cache_latents
from sgt_jax.data.pipeline import default_sources, make_train_iterator
from sgt_jax.data.records import BadSample
from sgt_jax.models.flux_vae import FluxVAE, make_stats_encoder

ATOL = 1e-5  # fp32, same encoder, same pixels: only op-order differences between batch shapes


def _square_world():
    from sgt_jax.configs_util import load_config

    cfg = load_config("configs/sgt_tiny.py")
    # all synthetic images 64x64 -> VAE targets 32x32 = the online canvas, where both paths must agree exactly
    cfg.data.sources.synthetic.num_samples = 8
    cfg.data.sources.synthetic.sizes = ((64, 64),)
    cfg.data.quota.vqa = 0
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A random tiny VAE (weights N(0, 0.1), filled from numpy: initialising through JAX is slow here) and the
    cache of the square world's 8 targets, in 2 shards."""
    import jax

    cfg = _square_world()
    with flax_nnx.use_eager_sharding(False):
        abstract = flax_nnx.eval_shape(lambda: FluxVAE(cfg.model.vae, rngs=flax_nnx.Rngs(0)))
    graphdef, state = flax_nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), state)
    vae = flax_nnx.merge(graphdef, state)
    path = str(tmp_path_factory.mktemp("latents"))
    src = default_sources(cfg)["seg"]
    report = cache_latents(cfg, path, encode=make_stats_encoder(vae, cfg.model.latent_patch_size), source=src,
                           batch_size=4, records_per_shard=4)
    assert report["written"] == len(src) == 8 and report["shards"] == 2
    return vae, path


def test_cached_and_online_latents_agree(built):
    vae, path = built
    cfg = _square_world()
    online = make_train_iterator(cfg)
    cfg.data.latents, cfg.data.latent_cache = "cached", path
    cached = make_train_iterator(cfg)
    encode = make_stats_encoder(vae, cfg.model.latent_patch_size)
    bo, bc = next(online), next(cached)
    for k in ("tokens", "kind", "latent_pos", "latent_image", "latent_target"):
        np.testing.assert_array_equal(bo[k], bc[k], err_msg=k)
    assert "vae_images" not in bc and "latent_mean" not in bo
    # online path as the train step does it: encode the canvas of every slot, gather each latent row
    b, ni = bo["vae_images"].shape[:2]
    mean, logvar = encode(bo["vae_images"].reshape((b * ni,) + bo["vae_images"].shape[2:]))
    grid_w = bo["vae_images"].shape[3] // 4  # tiny latent stride 4
    for i in range(b):
        rows = np.where(bo["latent_image"][i] >= 0)[0]
        assert rows.size > 0
        slot = bo["latent_image"][i, rows]
        r, c = bo["latent_rc"][i, rows, 0], bo["latent_rc"][i, rows, 1]
        np.testing.assert_allclose(bc["latent_mean"][i, rows], mean[i * ni + slot, r * grid_w + c], atol=ATOL)
        np.testing.assert_allclose(bc["latent_logvar"][i, rows], logvar[i * ni + slot, r * grid_w + c], atol=ATOL)
        assert (bc["latent_mean"][i, bo["latent_image"][i] < 0] == 0).all()
    assert np.abs(bc["latent_mean"]).max() > 0.01  # a real signal, not zeros on both sides


def test_cache_checks_settings_keys_and_overwrite(built):
    vae, path = built
    cfg = _square_world()
    with pytest.raises(FileExistsError):
        cache_latents(cfg, path, encode=make_stats_encoder(vae, cfg.model.latent_patch_size),
                      source=default_sources(cfg)["seg"])
    cfg.data.transforms.vae = (64, 16, 4)
    with pytest.raises(ValueError, match="built for other settings"):
        LatentCache(path, cfg)
    cache = LatentCache(path)
    with pytest.raises(BadSample) as err:
        cache.lookup("no-such-key")
    assert err.value.reason == "bad_record"
    with open(os.path.join(path, INDEX_NAME)) as f:
        assert json.load(f)["latent_dim"] == 16
    cfg.data.latents, cfg.data.latent_cache = "cached", ""
    with pytest.raises(ValueError, match="needs config.data.latent_cache"):
        make_train_iterator(cfg)


def test_load_vae_from_a_bagel_folder(built, tmp_path):
    from flax import nnx
    from safetensors.numpy import save_file

    from sgt_jax.checkpoint.convert import load_vae, params_to_vae_state_dict

    vae, _ = built
    cfg = _square_world()
    params = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in
               params_to_vae_state_dict(params, cfg.model.vae).items()}, str(tmp_path / "ae.safetensors"))
    cfg.checkpoint.init_from = str(tmp_path)
    loaded = load_vae(cfg.checkpoint.init_from, cfg.model.vae)
    import jax

    got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        load_vae(str(tmp_path / "missing"), cfg.model.vae)


@pytest.mark.multidevice
def test_encoder_is_data_parallel_over_devices(built):
    """make_stats_encoder splits the batch over the given devices (3 images padded to 8 rows): the statistics equal
    those of one device."""
    import jax

    vae, _ = built
    x = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    one = make_stats_encoder(vae, 2, devices=jax.devices()[:1])(x)
    eight = make_stats_encoder(vae, 2, devices=jax.devices()[:8])(x)
    assert one[0].shape == eight[0].shape == (3, 16 * 16 // 4, 16)
    for a, b in zip(one, eight):
        np.testing.assert_allclose(b, a, atol=ATOL)
