"""The sgt_jax command line.

    python -m sgt_jax.main --config FILE[:VARIANT] [--config.a.b=value ...] --workdir DIR [--mode MODE]

Modes (each lives in its own module; this file only parses flags and dispatches):
  train       SGT training (default)                                  sgt_jax/train/loop.py
  import      BAGEL PyTorch folder -> sharded Orbax checkpoint         sgt_jax/checkpoint/convert.py
  export      Orbax checkpoint -> BAGEL PyTorch folder                 sgt_jax/checkpoint/convert.py
  compile     AOT-compile the train step for a TPU topology (no TPU)   sgt_jax/compile.py
  prepare     raw data -> ArrayRecord shards (+ cached VAE latents)    sgt_jax/data/prepare.py
  understand  image(s) + question -> answer                            sgt_jax/sampling/cli.py
  generate    text (+ image) -> image                                  sgt_jax/sampling/cli.py
  segment     segmentation by generation, with mIoU                    sgt_jax/eval/cli.py
  evaluate    MCQ benchmarks, GenEval image dump                       sgt_jax/eval/cli.py
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from absl import app, flags
from ml_collections import config_flags

from sgt_jax import errors

MODES = {
    "train": ("sgt_jax.train.loop", "run"),
    "import": ("sgt_jax.checkpoint.convert", "run_import"),
    "export": ("sgt_jax.checkpoint.convert", "run_export"),
    "compile": ("sgt_jax.compile", "run"),
    "prepare": ("sgt_jax.data.prepare", "run"),
    "understand": ("sgt_jax.sampling.cli", "run_understand"),
    "generate": ("sgt_jax.sampling.cli", "run_generate"),
    "segment": ("sgt_jax.eval.cli", "run_segment"),
    "evaluate": ("sgt_jax.eval.cli", "run_evaluate"),
}
# Modes that do not need --config (the architecture comes from the files they read).
CONFIG_OPTIONAL = {"import", "export"}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file FILE[:VARIANT], e.g. configs/sgt_tiny.py or configs/bagel_sgt.py:7b. "
    "Override any field with --config.section.field=value.", lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to do (see the module docstring above).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, outputs.")
_SOURCE = flags.DEFINE_string("source", None, "import: BAGEL PyTorch folder to read. prepare: raw data root.")
_DEST = flags.DEFINE_string("dest", None, "export: folder to write the PyTorch checkpoint into.")
_PROMPT = flags.DEFINE_string("prompt", None, "understand/generate/segment: the text prompt or instruction.")
_IMAGE = flags.DEFINE_multi_string("image", [], "understand/generate/segment: input image path(s).")
_INPUT = flags.DEFINE_string("input", None, "A JSONL file of requests (understand/generate) or a benchmark "
                             "file/folder (evaluate, segment).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: latest).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "Which weights to load or export from a "
                             "training checkpoint: the EMA copy (default) or the raw parameters.")


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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    mode = _MODE.value
    if not _WORKDIR.value:
        raise errors.InputError(f"--workdir is required (the run folder of --mode={mode})")
    if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
        raise errors.InputError(f"--workdir {_WORKDIR.value}: is a file, not a folder")
    config = _CONFIG.value
    if config is None and mode not in CONFIG_OPTIONAL:
        raise errors.InputError(f"--config is required for --mode={mode} (e.g. --config configs/sgt_tiny.py)")
    args = ModeArgs(workdir=_WORKDIR.value, source=_SOURCE.value, dest=_DEST.value, prompt=_PROMPT.value,
                    images=tuple(_IMAGE.value), input=_INPUT.value, step=_STEP.value, weights=_WEIGHTS.value)
    module_name, fn_name = MODES[mode]
    fn = getattr(importlib.import_module(module_name), fn_name)
    fn(config, args)  # absl turns a returned value into a non-zero exit status: modes report by printing


def entry():
    errors.run_cli(lambda: app.run(main))  # input errors: one line, exit status 1 (--debug: traceback)


if __name__ == "__main__":
    entry()
