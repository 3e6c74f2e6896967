"""Finding and loading config files ``FILE.py[:VARIANT]`` (the CLI's ``--config``, tests, notebooks, scripts).

The configs live in one place, the repository's top-level ``configs/``; ``pip install .`` ships that folder
inside the package as ``sgt_jax/configs/`` (setup.py ``package_dir``). A config path that does not exist
as given is looked up by its file name there, so ``--config configs/sgt_tiny.py``, ``--config sgt_tiny.py``
and ``load_config("bagel_sgt.py:7b")`` work from any directory, in a checkout or an installed package.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
# a source checkout (also an editable install) first, then the copy inside an installed package
CONFIG_DIRS = (os.path.join(os.path.dirname(_PKG_DIR), "configs"), os.path.join(_PKG_DIR, "configs"))


def config_path(path: str) -> str:
    """``path`` itself if it exists, else the shipped config of that file name; FileNotFoundError if neither."""
    if os.path.exists(path):
        return path
    if not os.path.isabs(path):
        for folder in CONFIG_DIRS:
            shipped = os.path.join(folder, os.path.basename(path))
            if os.path.isfile(shipped):
                return shipped
    shipped = sorted({f for d in CONFIG_DIRS if os.path.isdir(d) for f in os.listdir(d)
                      if f.endswith(".py") and not f.startswith("_")})
    raise FileNotFoundError(f"config file not found: {path!r} (the shipped configs: {', '.join(shipped)})")


def resolve_spec(spec: str) -> str:
    """``FILE[:VARIANT]`` with FILE resolved by ``config_path``."""
    path, sep, variant = spec.partition(":")
    return config_path(path) + sep + variant


def flat_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
    """Every leaf field of ``config`` as ``(dotted.name, value)``, in sorted order (what ``--print_config`` shows)."""
    out = []
    for key in sorted(config.keys()):
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(flat_fields(value, f"{prefix}{key}."))
        else:
            out.append((prefix + key, value))
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/file.py[:variant]`` (resolved by ``config_path``) and call its ``get_config(variant)``."""
    path, _, variant = resolve_spec(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("_sgt_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()
