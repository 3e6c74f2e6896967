"""Optional dependencies (setup.py extras): imported where used, with one clear line when missing.

  [data]  tensorflow-datasets (kind "tfds", data/shapes_tfds.py), pycocotools (SA-1B RLE masks),
          pyarrow (parquet benchmark files of ``evaluate``)
  [eval]  scikit-learn (linear probe), matplotlib (probe and attention plots)
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or an ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is not installed ({err}); it comes with the [{extra}] extra: "
                          f"pip install 'sgt_jax[{extra}]'") from None
