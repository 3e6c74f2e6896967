"""Helpers shared by the tests that run training or the inference modes (integration and parity)."""

from __future__ import annotations

import json
import os


def read_metrics(workdir) -> list[dict]:
    """The rows of ``<workdir>/metrics.jsonl`` ([] while the file does not exist yet)."""
    path = os.path.join(str(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mode_args(workdir, **kw):
    """The ``ModeArgs`` a mode function takes (the CLI's flags as keywords)."""
    from sgt_jax.mode_args import ModeArgs

    return ModeArgs(workdir=workdir, **kw)


def config_with(name: str, overrides: dict):
    """``configs/<name>`` loaded, with ``{"a.b.c": value}`` set (dotted paths into the config)."""
    from sgt_jax.configs_util import load_config

    cfg = load_config(name)
    for key, value in overrides.items():
        *path, field = key.split(".")
        sec = cfg
        for p in path:
            sec = sec[p]
        sec[field] = value
    return cfg
