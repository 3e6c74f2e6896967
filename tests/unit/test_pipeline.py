"""The train iterator: exact quotas, per-process sharding without overlap, per-epoch reshuffle, exact resume
through JSON, bad samples skipped and counted, static shapes."""

import json

import numpy as np
import pytest

from sgt_jax.data.pipeline import build_stream, default_sources, make_train_iterator, reshard_states
from sgt_jax.data.records import BadSample
from sgt_jax.data.tokenizer import get_tokenizer


def _small_world(cfg, n=24):
    cfg.data.sources.synthetic.num_samples = n
    return cfg


def _assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_static_shapes_and_exact_quota(tiny_config):
    it = make_train_iterator(tiny_config)
    first = next(it)
    shapes = {k: v.shape for k, v in first.items()}
    for _ in range(5):
        b = next(it)
        assert {k: v.shape for k, v in b.items()} == shapes
        assert b["n_seg"].sum() == 2 * b["n_vqa"].sum() > 0  # 2:1 by samples in every batch
    st = it.stats()
    assert st["seg_per_vqa"] == 2.0 and st["quota_breaks"] == 0 and st["batches"] == 6
    assert 0 < st["efficiency"]["tokens"] <= 1 and st["skipped_total"] == {}
    assert shapes["tokens"][0] == tiny_config.data.packs_per_batch


def test_token_quota_tracks_target_share(tiny_config):
    tiny_config.data.quota.mode = "tokens"
    tiny_config.data.quota.seg, tiny_config.data.quota.vqa = 1, 1
    it = make_train_iterator(tiny_config)
    for _ in range(6):
        next(it)
    st = it.stats()
    assert abs(st["seg_token_share"] - 0.5) < 0.1, st
    tiny_config.data.quota.mode = "bytes"
    with pytest.raises(ValueError, match="'samples' or 'tokens'"):
        make_train_iterator(tiny_config)


def test_seg_only_quota(tiny_config):
    tiny_config.data.quota.vqa = 0
    b = next(make_train_iterator(tiny_config))
    assert b["n_vqa"].sum() == 0 and b["n_seg"].sum() > 0


def test_processes_read_disjoint_positions_and_epochs_reshuffle(tiny_config):
    cfg = _small_world(tiny_config)
    src = default_sources(cfg)["seg"]
    n = len(src)
    tok = get_tokenizer(cfg)
    keys = {}
    for p in range(2):
        s = build_stream(cfg, src, "seg", p, 2, tok)
        keys[p] = [s.next()["key"] for _ in range(n)]  # two epochs' worth of this process's half
    epoch0 = keys[0][: n // 2] + keys[1][: n // 2]
    epoch1 = keys[0][n // 2:] + keys[1][n // 2:]
    assert not set(keys[0][: n // 2]) & set(keys[1][: n // 2])  # no overlap between processes
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == n  # each epoch covers every record once
    assert epoch0 != epoch1  # ... in a new order
    with pytest.raises(ValueError, match="not divisible by process_count"):
        make_train_iterator(cfg, process_index=0, process_count=3)


@pytest.mark.parametrize("mode", ["samples", "tokens"])
def test_kill_and_resume_through_json(tiny_config, mode):
    cfg = _small_world(tiny_config)  # small world: the run crosses epoch boundaries
    cfg.data.quota.mode = mode
    it = make_train_iterator(cfg, process_index=1, process_count=2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["mixer"]["carry"], "a carried group makes the resume test meaningful"
    expected = [next(it) for _ in range(4)]
    resumed = make_train_iterator(cfg, process_index=1, process_count=2)
    resumed.set_state(state)
    for e in expected:
        _assert_same_batch(next(resumed), e)
    assert resumed.stats()["n_seg"] == it.stats()["n_seg"]
    other = make_train_iterator(cfg, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="is for process 1/2"):
        other.set_state(state)


class _FlakySource:
    """Wraps a source; every 4th record decodes as a BadSample."""

    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return self.src[i]

    def decode(self, raw):
        if raw["index"] % 4 == 0:
            raise BadSample("corrupt_image", f"synthetic #{raw['index']}")
        return self.src.decode(raw)


def test_bad_and_over_budget_samples_are_skipped_and_counted(tiny_config):
    cfg = _small_world(tiny_config, 32)
    srcs = default_sources(cfg)
    srcs["seg"] = _FlakySource(srcs["seg"])
    cfg.data.pack.ce_labels = 12  # some VQA samples need more labels than an empty pack has
    it = make_train_iterator(cfg, sources=srcs)
    for _ in range(4):
        b = next(it)
        assert b["n_seg"].sum() == 2 * b["n_vqa"].sum()
    st = it.stats()
    assert st["skipped"]["seg"]["corrupt_image"] > 0 and st["skipped"]["vqa"]["over_budget"] > 0
    assert st["skipped_total"]["corrupt_image"] == st["skipped"]["seg"]["corrupt_image"]
    positions = it.get_state()["positions"]
    # every seg position read was either packed, carried or counted as skipped
    assert positions["seg"] == st["n_seg"] + st["skipped"]["seg"]["corrupt_image"] + sum(
        1 for g, _ in it.get_state()["mixer"]["carry"] if g == "seg")


@pytest.mark.parametrize("old_n,new_n", [(2, 1), (1, 2)])
def test_reshard_states_for_another_process_count(tiny_config, old_n, new_n):
    """Elastic resume: no position is read twice, carried samples are kept (each by the process that
    owns its global position), counters are summed on process 0, and the new iterators run."""
    cfg = _small_world(tiny_config, n=64)
    olds = [make_train_iterator(cfg, process_index=i, process_count=old_n) for i in range(old_n)]
    for it in olds:
        for _ in range(3 if it.process_index == 0 else 2):  # uneven progress, like real processes
            next(it)
    states = [json.loads(json.dumps(it.get_state())) for it in olds]
    read = {g: [s["process_index"] + s["positions"][g] * old_n for s in states] for g in states[0]["positions"]}
    old_carry = sorted((g, s["process_index"] + i * old_n) for s in states for g, i in s["mixer"]["carry"])
    news, skipped_total = [], 0
    for j in range(new_n):
        state, skipped = reshard_states(states, j, new_n)
        skipped_total = skipped
        for g, pos in state["positions"].items():
            first = j + pos * new_n
            assert first >= max(read[g]) and first - max(read[g]) < new_n  # right after the furthest read
        it = make_train_iterator(cfg, process_index=j, process_count=new_n)
        it.set_state(state)
        news.append((it, state))
    new_carry = sorted((g, j + i * new_n) for j, (_, s) in enumerate(news) for g, i in s["mixer"]["carry"])
    assert new_carry == old_carry
    assert skipped_total == sum(-(-(max(r) - x) // old_n) for r in read.values() for x in r)
    totals = news[0][1]["mixer"]["totals"]
    for k in totals:
        assert totals[k] == sum(s["mixer"]["totals"][k] for s in states)
    for j, (it, _) in enumerate(news):
        if j:
            assert not any(it.get_state()["mixer"]["totals"].values())
        batch = next(it)
        assert batch["tokens"].shape[0] == cfg.data.packs_per_batch // new_n
        for g, stream in it.streams.items():  # reading went on from the resharded positions
            assert stream.pos >= news[j][1]["positions"][g]


def test_loop_restores_a_2_process_data_state_in_1_process_only_when_asked(tiny_config, caplog):
    from sgt_jax.train.loop import _restore_data_state

    cfg = _small_world(tiny_config, n=64)
    olds = [make_train_iterator(cfg, process_index=i, process_count=2) for i in range(2)]
    for it in olds:
        next(it)
    data = {"process_count": 2, "states": [it.get_state() for it in olds]}
    it = make_train_iterator(cfg)
    with pytest.raises(ValueError, match="reshard_on_resume"):
        _restore_data_state(it, data)
    _restore_data_state(it, data, reshard=True)
    assert "resharded from 2 to 1 processes" in caplog.text
    assert it.get_state()["mixer"]["totals"]["batches"] == 2
    next(it)
