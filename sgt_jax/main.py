"""The sgt_jax command line.

    python -m sgt_jax.main --config FILE[:VARIANT] [--config.a.b=value ...] --workdir DIR [--mode MODE]

Modes (each lives in its own module; this file only parses flags and dispatches):
  train       SGT training (default)                                  sgt_jax/train/loop.py
  import      BAGEL or OmniGen2 folder -> sharded Orbax checkpoint     sgt_jax/checkpoint/convert.py
  export      Orbax checkpoint -> BAGEL / OmniGen2 PyTorch folder      sgt_jax/checkpoint/convert.py
  compile     AOT-compile the train step for a TPU topology (no TPU)   sgt_jax/compile.py
  prepare     raw data -> ArrayRecord shards (+ cached VAE latents)    sgt_jax/train/prepare_latents.py
  understand  image(s) + question -> answer                            sgt_jax/sampling/cli.py
  generate    text (+ image) -> image                                  sgt_jax/sampling/cli.py
  segment     segmentation by generation, with mIoU                    sgt_jax/eval/cli.py
  evaluate    MCQ accuracy, GenEval images (+ presets), probe, attention   sgt_jax/eval/cli.py

``--print_config`` prints the resolved config (every field, overrides applied) and exits.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from sgt_jax import errors
from sgt_jax.configs_util import flat_fields, resolve_spec
from sgt_jax.mode_args import ModeArgs

MODES = {
    "train": ("sgt_jax.train.loop", "run"),
    "import": ("sgt_jax.checkpoint.convert", "run_import"),
    "export": ("sgt_jax.checkpoint.convert", "run_export"),
    "compile": ("sgt_jax.compile", "run"),
    "prepare": ("sgt_jax.train.prepare_latents", "run"),
    "understand": ("sgt_jax.sampling.cli", "run_understand"),
    "generate": ("sgt_jax.sampling.cli", "run_generate"),
    "segment": ("sgt_jax.eval.cli", "run_segment"),
    "evaluate": ("sgt_jax.eval.cli", "run_evaluate"),
}
# Modes that do not need --config (the architecture comes from the files they read).
CONFIG_OPTIONAL = {"import", "export"}


class _ConfigParser(ConfigFileFlagParser):
    """``--config`` also finds the shipped configs by file name, from any directory (sgt_jax/configs_util.py)."""

    def parse(self, path):
        try:
            path = resolve_spec(path)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None  # absl: one line naming the flag
        return super().parse(path)


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file FILE[:VARIANT], e.g. configs/sgt_tiny.py or configs/bagel_sgt.py:7b (a file "
    "name alone finds the configs shipped with the package, from any directory). Override any field with "
    "--config.section.field=value.", lock_config=True)
flags.FLAGS["config"].parser = _ConfigParser("config", lock_config=True)
_MODE = flags.DEFINE_enum(
    "mode", "train", list(MODES),
    "What to do: train (SGT training), import (BAGEL or OmniGen2 PyTorch folder -> params), export (params or "
    "checkpoint -> BAGEL / OmniGen2 folder), compile (AOT for a TPU topology, no TPU needed), prepare (raw data -> shards, + cached "
    "latents), understand (image + question -> answer), generate (text [+ image] -> image), segment "
    "(segmentation by generation + mIoU), evaluate (what --config.evaluate.kind says: mcq = multiple-choice "
    "accuracy (CV-Bench layout), geneval = GenEval image dump, probe = linear probe of ViT/LLM features, "
    "attention = attention allocation; --config.evaluate.preset=geneval_official or geneval_short sets the "
    "official GenEval settings, docs/inference.md).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Required (except with --print_config): run directory for "
                               "checkpoints, metrics and outputs.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (every field with its "
                                  "value, overrides applied) and exit: find the --config.a.b=value you need.")
_SOURCE = flags.DEFINE_string("source", None, "import: BAGEL or OmniGen2 PyTorch folder to read (the family is "
                                  "recognised from the layout). prepare: raw data root.")
_DEST = flags.DEFINE_string("dest", None, "export: folder to write the PyTorch checkpoint into.")
_PROMPT = flags.DEFINE_string("prompt", None, "understand/generate/segment: the text prompt or instruction.")
_IMAGE = flags.DEFINE_multi_string("image", [], "understand/generate/segment: input image path(s).")
_INPUT = flags.DEFINE_string("input", None, "A JSONL file of requests (understand/generate) or a benchmark "
                             "file/folder (evaluate, segment).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: latest).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "Which weights to load or export from a "
                             "training checkpoint: the EMA copy (default) or the raw parameters.")


class _NoTpuProbeNoise(logging.Filter):
    """Drops JAX's "Unable to initialize backend 'tpu'" line (libtpu installed, no TPU here)."""

    def filter(self, record):
        return "Unable to initialize backend 'tpu'" not in record.getMessage()


def _quiet_tpu_probe(config) -> None:
    """On a machine without TPU chips, and a config that does not ask for a TPU, JAX's failed TPU probe is
    noise (and was the first line users saw): filter it out. On a TPU VM it stays, as a real warning."""
    tpu_here = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    if not tpu_here and (config is None or config.train.platform != "tpu"):
        logging.getLogger("jax._src.xla_bridge").addFilter(_NoTpuProbeNoise())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    mode = _MODE.value
    config = _CONFIG.value
    if _PRINT_CONFIG.value:
        if config is None:
            raise errors.InputError("--print_config needs --config")
        print("\n".join(f"--config.{name}={value!r}" for name, value in flat_fields(config)))
        return
    if not _WORKDIR.value:
        raise errors.InputError(f"--workdir is required (the run folder of --mode={mode})")
    if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
        raise errors.InputError(f"--workdir {_WORKDIR.value}: is a file, not a folder")
    if config is None and mode not in CONFIG_OPTIONAL:
        raise errors.InputError(f"--config is required for --mode={mode} (e.g. --config configs/sgt_tiny.py)")
    _quiet_tpu_probe(config)
    args = ModeArgs(workdir=_WORKDIR.value, source=_SOURCE.value, dest=_DEST.value, prompt=_PROMPT.value,
                    images=tuple(_IMAGE.value), input=_INPUT.value, step=_STEP.value, weights=_WEIGHTS.value)
    module_name, fn_name = MODES[mode]
    fn = getattr(importlib.import_module(module_name), fn_name)
    fn(config, args)  # absl turns a returned value into a non-zero exit status: modes report by printing


def entry():
    errors.run_cli(lambda: app.run(main))  # input errors: one line, exit status 1 (--debug: traceback)


if __name__ == "__main__":
    entry()
