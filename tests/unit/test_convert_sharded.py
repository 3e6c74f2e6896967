"""Sharded import/export on 8 fake CPU devices: every device shard is read as a slice, values are exact."""

import os

import numpy as np
import pytest
from safetensors import safe_open

from sgt_jax.checkpoint import convert, safetensors_io
from sgt_jax.checkpoint.table import flatten_paths
from sgt_jax.configs_util import load_config
from sgt_jax.models.bagel import abstract_params
from sgt_jax.parallel.mesh import logical_rules, make_mesh
from tests.fixtures.bagel_folder import write_bagel_folder


@pytest.mark.multidevice
def test_sharded_import_reads_slices_and_round_trips(tmp_path, monkeypatch):
    import jax

    assert jax.device_count() == 8
    config = load_config("configs/sgt_tiny.py")  # mesh (1, -1, 1): fsdp over the 8 devices
    m = config.model
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_bagel_folder(src, m, seed=11)

    reads: dict[str, list[int]] = {}
    real_read = safetensors_io.SliceReader.read

    def spy(self, name, index=None):
        arr = real_read(self, name, index)
        reads.setdefault(name, []).append(arr.size)
        return arr

    monkeypatch.setattr(safetensors_io.SliceReader, "read", spy)
    params, cfg_model, meta = convert.import_folder(src, config, progress=False)

    emb = params["llm"]["embed_tokens"]["embedding"]
    assert not emb.sharding.is_fully_replicated
    assert len(emb.sharding.device_set) == 8
    v, h = m.llm.vocab_size, m.llm.hidden_size
    sizes = reads["language_model.model.embed_tokens.weight"]
    assert max(sizes) < v * h and sum(sizes) == v * h  # 8 disjoint slices, together the tensor once
    up = reads["language_model.model.layers.0.mlp_moe_gen.up_proj.weight"]
    assert max(up) < m.llm.intermediate_size * h and sum(up) == m.llm.intermediate_size * h
    with safe_open(os.path.join(src, "ema.safetensors"), "numpy") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    direct = flatten_paths(convert.bagel_state_dict_to_params(sd, m))
    got = flatten_paths({k: val for k, val in params.items() if k != "vae"})
    assert set(direct) == set(got)
    for k in direct:
        np.testing.assert_array_equal(np.asarray(got[k]), direct[k], err_msg=str(k))

    # block-by-block filling (what big parameters use) gives the same arrays with the same shardings
    from sgt_jax.checkpoint import streaming
    from sgt_jax.checkpoint.table import get_path

    abstract = abstract_params(cfg_model, mesh=make_mesh(config.mesh), rules=logical_rules(config))
    with safetensors_io.SliceReader(os.path.join(src, "ema.safetensors")) as reader:
        for e in convert.bagel_table(cfg_model):
            if e.path[-1] not in ("embedding", "kernel"):
                continue
            arr = streaming.fill_entry(e, reader, get_path(abstract, e.path), block_bytes=1024)
            ref = get_path(params, e.path)
            assert arr.sharding == ref.sharding, e.path
            np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref), err_msg=str(e.path))

    convert.export_folder(params, cfg_model, out, meta, progress=False)
    for name in ("ema.safetensors", "ae.safetensors"):
        with safe_open(os.path.join(src, name), "numpy") as a, safe_open(os.path.join(out, name), "numpy") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():
                x, y = a.get_tensor(k), b.get_tensor(k)
                assert x.dtype == y.dtype, k
                np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=k)
