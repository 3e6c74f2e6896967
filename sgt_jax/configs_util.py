"""Loading `configs/<file>.py[:variant]` config files outside absl (tests, notebooks, scripts)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/file.py[:variant]`` and call its ``get_config(variant)``.

    Relative paths are tried against the current directory, then against the repository root, so
    ``load_config("configs/sgt_tiny.py")`` works from anywhere in a source checkout.
    """
    path, _, variant = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(_REPO_ROOT, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {spec!r}")
    module_spec = importlib.util.spec_from_file_location("_sgt_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()
