"""Parity tests need the [torch] extra (torch, transformers, diffusers).

Each parity module starts with ``torch = pytest.importorskip("torch", reason=...)`` so that without the
extra it is skipped with a stated reason (the Python 3.12 CI leg). With SGT_REQUIRE_TORCH=1 (the Python
3.11 CI leg) a missing extra is an error instead: parity must run there, never skip.
"""

import os

import pytest


def _missing_torch():
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.sep + "parity" + os.sep in str(item.fspath):
            item.add_marker(pytest.mark.parity)


if os.environ.get("SGT_REQUIRE_TORCH") == "1":
    _missing = _missing_torch()
    if _missing:
        raise pytest.UsageError(f"SGT_REQUIRE_TORCH=1 but the [torch] extra is missing: {_missing}")
