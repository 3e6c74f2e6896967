"""The OmniGen2 assembly (sgt_jax/models/omnigen2.py) and its config (configs/omnigen2_sgt.py)."""

import jax
import pytest
from flax import nnx

from sgt_jax.checkpoint import omnigen2_folder
from sgt_jax.configs_util import load_config
from sgt_jax.models.groups import OMNIGEN2_GROUPS, group_of
from sgt_jax.models.omnigen2 import OmniGen2
from sgt_jax.parallel.sharding import abstract_params_of


def _paths(tree):
    return {tuple(str(getattr(k, "key", k)) for k in p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_param_tree_is_the_import_tree(variant="tiny"):
    """An imported workdir ({"dit", "vae", "mllm"}) restores into the module: same paths and shapes."""
    c = load_config(f"configs/omnigen2_sgt.py:{variant}")
    model = abstract_params_of(lambda: OmniGen2(c.model, rngs=nnx.Rngs(0)))
    imported = omnigen2_folder.abstract_params(c.model.dit, c.model.vae, c.model.mllm, None, ())
    assert _paths(model) == _paths(imported)
    groups = {group_of(p) for p in _paths(model)}
    assert groups == set(OMNIGEN2_GROUPS) == {"mllm_vision", "mllm_text", "dit", "vae"}


def test_3b_sizes():
    c = load_config("configs/omnigen2_sgt.py:3b")
    model = abstract_params_of(lambda: OmniGen2(c.model, rngs=nnx.Rngs(0), with_vae=False))
    n = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in model.items()}
    assert n == {"mllm": 3_754_622_976, "dit": 3_967_161_400}  # docs/omnigen2.md: both counted independently


def test_shared_compute_settings_follow_the_model_section():
    c = load_config("configs/omnigen2_sgt.py:tiny")
    c.model.dtype = "bfloat16"
    c.model.scan_layers = False
    assert (c.model.mllm.dtype, c.model.dit.dtype, c.model.mllm.scan_layers, c.model.dit.scan_layers) == (
        "bfloat16", "bfloat16", False, False)


def test_bad_model_section_is_named():
    c = load_config("configs/omnigen2_sgt.py:tiny")
    c.model.dit.text_feat_dim = 32
    with pytest.raises(ValueError, match="config.model.dit.text_feat_dim=32"):
        OmniGen2(c.model, rngs=nnx.Rngs(0))
