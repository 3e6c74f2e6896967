"""The arguments every mode's ``run(config, args)`` receives besides the config (the CLI's non-config flags).

Kept apart from sgt_jax/main.py so that modes, notebooks and tests build them without importing the CLI.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModeArgs:
    """The non-config flags, handed to every mode's ``run`` function."""

    workdir: str
    source: str | None = None
    dest: str | None = None
    prompt: str | None = None
    images: tuple[str, ...] = ()
    input: str | None = None
    step: int | None = None
    weights: str = "ema"
