"""``bench/toy_sgt.py --measure``: the CPU cost of each stage of the full study, from a few steps/items.

Every cost is a difference of process CPU time between two runs that differ only in length (so start-up,
checkpoint restore and compilation cancel out), divided by the difference in length; the first run of a
kind also gives its fixed cost (compile + start-up). The lengths differ by 20 steps (8-10 items): a
compilation varies by several CPU seconds between two runs, so a difference of a few steps (this tool's
first version used 3-6) can be wrong by a factor of 10; it under-estimated the VAE step 10x. CPU seconds, not wall: on a shared machine wall time
says more about the neighbours than about the study. On an idle 2-core machine the wall time of a stage
lies between CPU/2 (both cores busy all the time) and CPU (one core busy).
"""

from __future__ import annotations

import json
import os
import time


def _cpu(fn):
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def measure(workdir: str, hp: dict, study_config, lib, ev, k: int = 20) -> dict:
    os.makedirs(workdir, exist_ok=True)
    out = {}
    v = hp["vae"]
    cfg = study_config(hp, None, stage="base")
    runs = {}

    def vae(steps):
        runs["vae"] = lib.train_vae(cfg, steps=steps, batch=v["batch"], lr=v["lr"], kl_weight=v["kl_weight"], seed=0,
                                    eval_n=4)

    first = _cpu(lambda: vae(2))
    more = _cpu(lambda: vae(2 + k))
    out["vae_step"] = (more - first) / k
    out["vae_fixed"] = first - 2 * out["vae_step"]
    stats = {kk: runs["vae"][kk] for kk in ("latent_mean", "latent_std")}
    init = os.path.join(workdir, "init")
    out["init_fixed"] = _cpu(lambda: lib.write_init(study_config(hp, stats, stage="base"), runs["vae"]["params"], init))
    for stage, n_vqa, n_gen, task in (("base", hp["base"]["n_vqa"], hp["base"]["n_gen"], "t2i"),
                                      ("arms", hp["arms"]["n_vqa"], 4 * hp["arms"]["n_vqa"], "segmentation")):
        run_dir = os.path.join(workdir, stage)

        def train(steps):
            c = study_config(hp, stats, stage=stage, init_from=init)
            c.train.steps, c.checkpoint.every = steps, 1000
            lib.train_run(c, run_dir, n_vqa=n_vqa, n_gen=n_gen, gen_task=task, data_seed=1)

        first = _cpu(lambda: train(2))
        more = _cpu(lambda: train(2 + k))
        out[f"{stage}_step"] = (more - first) / k
        out[f"{stage}_fixed"] = first - 2 * out[f"{stage}_step"]
    # evaluations, on the arms run
    c = study_config(hp, stats, stage="arms", init_from=init)
    run_dir = os.path.join(workdir, "arms")
    from sgt_jax.sampling.cli import make_inferencer

    inf = make_inferencer(c, ev._args(run_dir))
    for name, fn, n1, n2 in (
            ("mcq_item", lambda n: ev.eval_mcq(inf, c, ev.mcq_items(c, n)), 2, 10),
            ("geneval_item", lambda n: ev.eval_geneval(inf, c, n, os.path.join(workdir, "gen")), 6, 16)):
        fn(n1)  # compile
        a = _cpu(lambda: fn(n1))
        b = _cpu(lambda: fn(n2))
        per = (b - a) / (n2 - n1)
        out[name] = per / (5 if name == "mcq_item" else 1)  # mcq_items(n) makes n per kind, 5 kinds

    def seg(n):
        c.segment.num_images = n
        ev.eval_segment(c, run_dir)

    first = _cpu(lambda: seg(2))
    b = _cpu(lambda: seg(10))
    out["seg_item"] = (b - _cpu(lambda: seg(2))) / 8
    out["eval_fixed"] = first - 2 * out["seg_item"]
    out["analysis"] = _cpu(lambda: ev.eval_probe_attention(c, run_dir))
    out["estimate"] = estimate(out, hp)
    with open(os.path.join(workdir, "measure.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def estimate(m: dict, hp: dict) -> dict:
    """CPU seconds of the full study with the lengths of ``hp``, per stage kind."""
    n_arm_runs = 6 * int(hp["seeds"])
    e = hp["eval"]
    per_eval = 5 * e["mcq_per_kind"] * m["mcq_item"] + e["geneval_prompts"] * m["geneval_item"] + \
        e["seg_images"] * m["seg_item"] + m["eval_fixed"]
    est = dict(
        vae=m["vae_fixed"] + hp["vae"]["steps"] * m["vae_step"],
        init=m["init_fixed"],
        base=m["base_fixed"] + hp["base"]["steps"] * m["base_step"],
        arms=n_arm_runs * (m["arms_fixed"] + hp["arms"]["steps"] * m["arms_step"]),
        evals=(1 + n_arm_runs) * per_eval + 3 * m["analysis"],
    )
    est["total"] = sum(est.values())
    return est
