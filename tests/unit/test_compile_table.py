"""bench/compile_table.py's row workdirs: a cached report is reused only by the case that made it."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compile_table  # noqa: E402

P8 = ("--config.data.pack.und_tokens=3072,--config.data.pack.gen_tokens=5120,--config.data.pack.vit_patches=3072,"
      "--config.data.pack.ce_labels=2048")


def test_short_case_keeps_its_readable_name():
    assert compile_table.row_name("v5p-16:--config.model.remat_policy=qkv_out") == \
        "v5p-16_--config.model.remat_policy_qkv_out"


def test_long_cases_differing_only_at_the_end_get_different_workdirs():
    a = f"v6e-16:{P8},--config.compile.packs_per_chip=1"
    b = a + ",--config.train.ema_dtype=bfloat16,--config.optim.mu_dtype=bfloat16"
    na, nb = compile_table.row_name(a), compile_table.row_name(b)
    assert na != nb and na[:100] == nb[:100]  # the same readable prefix, a different hash of the whole case
    assert max(len(na), len(nb)) <= 120 and compile_table.row_name(b) == nb
