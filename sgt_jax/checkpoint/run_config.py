"""The run config as the conversion modes use it: the default config (BAGEL-7B-MoT's), the mesh and logical
rules it describes, and plain-JSON copies of config sections for ``params_meta.json``. Shared by the BAGEL
(convert.py) and OmniGen2 (omnigen2_folder.py) conversions."""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from sgt_jax.configs_util import load_config
from sgt_jax.parallel.mesh import logical_rules, make_mesh


def default_config() -> ml_collections.ConfigDict:
    return load_config("bagel_sgt.py:7b")


def mesh_and_rules(config):
    return make_mesh(config.mesh), logical_rules(config)


def jsonable(x):
    """``x`` with ConfigDicts and mappings as dicts and tuples as lists (what ``json.dump`` writes)."""
    if isinstance(x, ml_collections.ConfigDict):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
