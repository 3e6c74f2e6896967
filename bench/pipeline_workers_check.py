"""Manual check: Grain worker processes (config.data.workers > 0) give the same batches as in-process decoding,
and resume exactly. Slow on a loaded machine (worker start-up), so it is not part of the test suite.

    .venv/bin/python bench/pipeline_workers_check.py [--workers 2] [--batches 3]
"""

import argparse
import time

import numpy as np

from sgt_jax.configs_util import load_config
from sgt_jax.data.pipeline import make_train_iterator


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config("configs/sgt_tiny.py")
    ref_it = make_train_iterator(cfg)
    ref = [next(ref_it) for _ in range(2 * args.batches)]
    cfg.data.workers = args.workers
    t0 = time.perf_counter()
    it = make_train_iterator(cfg)
    for r in ref[: args.batches]:
        _same(next(it), r)
    state = it.get_state()
    it.close()
    resumed = make_train_iterator(cfg)
    resumed.set_state(state)
    for r in ref[args.batches:]:
        _same(next(resumed), r)
    resumed.close()
    print(f"workers={args.workers}: {2 * args.batches} batches equal to workers=0 (incl. resume) "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
