"""Run the OmniGen2 tiny training (the real data pipeline and loop) with a delay per batch, for the resume
tests: ``python -m tests.integration.og2_runner WORKDIR STEPS EVERY [DELAY_S] [--config.x=y ...]``."""

from __future__ import annotations

import sys
import time

from sgt_jax.configs_util import load_config
from sgt_jax.data.omnigen2_pipeline import make_train_iterator
from sgt_jax.mode_args import ModeArgs
from sgt_jax.train import loop


def small_config():
    c = load_config("configs/omnigen2_sgt.py:tiny")
    c.data.omnigen2.update(dict(text_tokens=80, ce_labels=24))
    c.train.ce_chunk = 8
    c.checkpoint.async_save = False
    c.train.tensorboard = False
    return c


class _Slow:
    """The real iterator, ``delay`` seconds per batch (so a test can kill the run between steps)."""

    def __init__(self, it, delay: float):
        self.it, self.delay = it, delay

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        return next(self.it)

    def __getattr__(self, name):  # get_state, set_state, stats, close
        return getattr(self.it, name)


def main(argv):
    workdir, steps, every = argv[1], int(argv[2]), int(argv[3])
    delay = float(argv[4]) if len(argv) > 4 else 0.0
    c = small_config()
    c.train.steps, c.checkpoint.every = steps, every
    return loop.run(c, ModeArgs(workdir=workdir),
                    iterator_fn=lambda config, **kw: _Slow(make_train_iterator(config, **kw), delay))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
