"""A folder written by transformers' ``save_pretrained`` imports exactly, and our export loads back into
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` with every tensor bit-identical (tiny random model,
tied head like 3B, fp32 and bf16 folders)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
transformers = pytest.importorskip("transformers", reason="needs the [torch] extra")

from sgt_jax.checkpoint import qwen2_5_vl_folder as qf  # noqa: E402
from sgt_jax.checkpoint import qwen2_5_vl_table as qt  # noqa: E402
from sgt_jax.checkpoint.table import flatten_paths  # noqa: E402
from sgt_jax.configs_util import load_config  # noqa: E402
from sgt_jax.models import qwen2_5_vl as qvl  # noqa: E402
from tests.fixtures.qwen2_5_vl_folder import hf_config  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_folder_round_trip(tmp_path, dtype):
    cfg = qvl.config("tiny")
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(cfg)).to(dtype).eval()
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    hf.save_pretrained(src)
    sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}

    params, got_cfg, meta = qf.import_qwen2_5_vl(src, load_config("configs/sgt_tiny.py"))
    assert meta["layout"] == "legacy" and "lm_head.weight" not in meta["files"]
    assert got_cfg.text.to_dict() == cfg.text.to_dict() and got_cfg.vision.to_dict() == cfg.vision.to_dict()
    want = flatten_paths(qt.state_dict_to_params(sd, cfg))
    got = flatten_paths(params)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg="/".join(k))

    qf.export_qwen2_5_vl(params, got_cfg, out, meta)
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=dtype).eval()
    back_sd = back.state_dict()
    assert sorted(back_sd) == sorted(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert back_sd[k].dtype == dtype, k
        assert torch.equal(back_sd[k], v), k
