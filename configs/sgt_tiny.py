"""The default config: a tiny BAGEL-shaped model SGT-trained on the built-in synthetic shapes world.

Runs on any CPU in minutes with no download:
    python -m sgt_jax.main --config configs/sgt_tiny.py --workdir runs/tiny
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_bagel_sgt", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bagel_sgt.py")
)
_bagel_sgt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bagel_sgt)


def get_config(variant: str = ""):
    del variant
    return _bagel_sgt.get_config("tiny")
