"""Does SGT help at small scale? The paper's ablation on a CPU, on the synthetic shapes world, in one command.

    python bench/toy_sgt.py --workdir runs/toy            # the study -> bench/results/toy_sgt.md
    python bench/toy_sgt.py --workdir runs/toy_q --quick  # every stage at toy length -> <workdir>/toy_sgt.md

Stages (each writes <workdir>/stages/<name>.json when done; a rerun skips finished stages, and an
interrupted training stage resumes from its own checkpoints):
  vae      train the small config's FLUX VAE on the world's scenes (the random one reconstructs nothing)
  init     the model's random init + that VAE, as an imported workdir
  base     pre-train from scratch on text-to-image + VQA (captioning, count, colour, existence, position,
           size): the stand-in for base BAGEL; exported as the ONE checkpoint every arm starts from
  arm_*    each arm x seed from the base, same steps, same VQA samples per step, same hyper-parameters:
           sft (VQA only), sgt_2to1, recon_2to1, edge_2to1, sgt_1to1, sgt_4to1
  eval_*   held-out MCQ / GenEval-style / segmentation mIoU (+ probe and attention for base, sft, sgt_2to1)
  report   tables with 95 % bootstrap intervals (questions x seeds) and PNG plots

The hyper-parameters are fixed here (HP) and listed in the report; nothing is tuned per arm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

# Fixed before any run (docs in bench/results/toy_sgt.md). "quick" only shortens lengths and sizes.
HP = dict(
    vae=dict(steps=400, batch=16, lr=1e-3, kl_weight=1e-6, eval_n=64),
    base=dict(steps=800, lr=5e-4, warmup=50, n_vqa=2, n_gen=4),
    arms=dict(steps=120, lr=2e-4, warmup=10, n_vqa=1),
    common=dict(clip_norm=1.0, b1=0.9, b2=0.95, weight_decay=0.0, ce_weight=1.5, mse_weight=1.0,
                timestep_shift=1.0, text_cond_dropout=0.1, ema_decay=0.0, checkpoint_every=40),
    seeds=3,
    eval=dict(mcq_per_kind=60, geneval_prompts=24, seg_images=16, probe_images=40, attn_prompts=4,
              num_timesteps=12),
)
QUICK = dict(
    vae=dict(steps=8, batch=4, eval_n=4), base=dict(steps=3), arms=dict(steps=2), common=dict(checkpoint_every=2),
    seeds=1, eval=dict(mcq_per_kind=2, geneval_prompts=1, seg_images=1, probe_images=8, attn_prompts=1,
                       num_timesteps=3),
)
# arm -> (generation task of the extra samples or None, generation samples per VQA sample)
ARMS = {
    "sft": (None, 0),
    "sgt_2to1": ("segmentation", 2),
    "recon_2to1": ("reconstruction", 2),
    "edge_2to1": ("edge", 2),
    "sgt_1to1": ("segmentation", 1),
    "sgt_4to1": ("segmentation", 4),
}
ANALYSIS_RUNS = ("base", "sft_s0", "sgt_2to1_s0")


def hyper_parameters(quick: bool) -> dict:
    hp = json.loads(json.dumps(HP))
    if quick:
        for k, v in QUICK.items():
            if isinstance(v, dict):
                hp[k].update(v)
            else:
                hp[k] = v
    return hp


def run_stage(workdir: str, name: str, fn, log=print):
    """Run ``fn()`` unless <workdir>/stages/<name>.json exists; store its (JSON) result and wall time."""
    path = os.path.join(workdir, "stages", f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            log(f"[toy_sgt] {name}: done before, skipped")
            return json.load(f)["result"]
    log(f"[toy_sgt] {name}: running")
    t0, c0 = time.time(), time.process_time()
    result = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    wall, cpu = time.time() - t0, time.process_time() - c0
    with open(tmp, "w") as f:
        json.dump({"result": result, "seconds": wall, "cpu_seconds": cpu}, f)
    os.replace(tmp, path)
    log(f"[toy_sgt] {name}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    return result


def stage_seconds(workdir: str) -> dict:
    """{stage: (wall seconds, CPU seconds of this process)} of the finished stages."""
    d = os.path.join(workdir, "stages")
    out = {}
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if n.endswith(".json"):
            with open(os.path.join(d, n)) as f:
                r = json.load(f)
                out[n[:-5]] = (r["seconds"], r.get("cpu_seconds", float("nan")))
    return out


def study_config(hp: dict, vae_stats: dict | None, *, stage: str, seed: int = 0, init_from: str = ""):
    """configs/bagel_sgt.py:small with the study's fixed hyper-parameters for ``stage`` ("base" | "arms")."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import bagel_sgt

    c = bagel_sgt.get_config("small")
    cm, st = hp["common"], hp[stage]
    c.train.steps = int(st["steps"])
    c.train.seed = 1000 * (seed + 1) + (0 if stage == "base" else 7)
    c.train.ce_weight, c.train.mse_weight = cm["ce_weight"], cm["mse_weight"]
    c.train.timestep_shift, c.train.ema_decay = cm["timestep_shift"], cm["ema_decay"]
    c.train.tensorboard = False
    c.optim.update(dict(lr=st["lr"], warmup_steps=st["warmup"], schedule="constant", clip_norm=cm["clip_norm"],
                        b1=cm["b1"], b2=cm["b2"], weight_decay=cm["weight_decay"]))
    c.data.text_cond_dropout = cm["text_cond_dropout"]
    c.checkpoint.every = int(cm["checkpoint_every"])
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.checkpoint.init_from = init_from
    ev = hp["eval"]
    c.generate.num_timesteps = int(ev["num_timesteps"])
    c.segment.num_images = int(ev["seg_images"])
    c.segment.save_overlays = False
    c.analysis.update(dict(probe_num_images=int(ev["probe_images"]), attn_num_prompts=int(ev["attn_prompts"]),
                           probe_llm_layers=(1, 3)))
    if vae_stats:
        c.model.vae.scale_factor = float(1.0 / max(vae_stats["latent_std"], 1e-6))
        c.model.vae.shift_factor = float(vae_stats["latent_mean"])
    return c


def _save_vae(workdir: str, res: dict) -> dict:
    import numpy as np
    from PIL import Image

    flat = {}

    def walk(d, pre):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{pre}{k}/")
            else:
                flat[f"{pre}{k}"] = np.asarray(v)

    walk(res["params"], "")
    os.makedirs(os.path.join(workdir, "vae"), exist_ok=True)
    np.savez(os.path.join(workdir, "vae", "params.npz"), **flat)
    to_u8 = lambda x: np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)  # noqa: E731
    k = min(8, len(res["held"]))
    grid = np.concatenate([np.concatenate(list(to_u8(res["held"][:k])), 1),
                           np.concatenate(list(to_u8(res["recon"][:k])), 1)], 0)
    Image.fromarray(grid).save(os.path.join(workdir, "vae", "reconstructions.png"))
    return {k_: res[k_] for k_ in ("psnr_random", "psnr", "latent_mean", "latent_std")} | dict(
        loss_first=res["losses"][0], loss_last=float(np.mean(res["losses"][-20:])))


def _load_vae(workdir: str) -> dict:
    import numpy as np

    out = {}
    with np.load(os.path.join(workdir, "vae", "params.npz")) as z:
        for key in z.files:
            d = out
            parts = key.split("/")
            for p in parts[:-1]:
                d = d.setdefault(int(p) if p.isdigit() else p, {})
            d[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = z[key]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--quick", action="store_true", help="every stage at toy length (CI smoke test)")
    ap.add_argument("--measure", action="store_true",
                    help="measure the CPU cost per step/item of every stage and extrapolate the full study "
                         "(bench/toy_sgt_measure.py); writes <workdir>/measure.json")
    ap.add_argument("--jax-cache", default="", help="persistent compilation cache (default <workdir>/jax_cache)")
    ap.add_argument("--report", default="", help="report path (default: bench/results/toy_sgt.md; "
                                                  "--quick: <workdir>/toy_sgt.md)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", args.jax_cache or os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import toy_sgt_eval as ev
    import toy_sgt_lib as lib
    from toy_sgt_report import write_report

    hp = hyper_parameters(args.quick)
    t_start = time.time()
    if args.measure:
        from toy_sgt_measure import measure

        m = measure(workdir, hyper_parameters(False), study_config, lib, ev)
        print(json.dumps(m, indent=1))
        return 0
    base_cfg = lambda vs, **kw: study_config(hp, vs, stage="base", **kw)  # noqa: E731

    def vae_stage():
        v = hp["vae"]
        res = lib.train_vae(base_cfg(None), steps=v["steps"], batch=v["batch"], lr=v["lr"],
                            kl_weight=v["kl_weight"], seed=0, eval_n=v["eval_n"])
        return _save_vae(workdir, res)

    vae_stats = run_stage(workdir, "vae", vae_stage)
    init_dir, base_dir = os.path.join(workdir, "init"), os.path.join(workdir, "base")
    base_params = os.path.join(workdir, "base_params")
    run_stage(workdir, "init", lambda: lib.write_init(base_cfg(vae_stats), _load_vae(workdir), init_dir) or {})

    def base_stage():
        b = hp["base"]
        r = lib.train_run(base_cfg(vae_stats, init_from=init_dir), base_dir, n_vqa=b["n_vqa"], n_gen=b["n_gen"],
                          gen_task="t2i", data_seed=1)
        lib.export_run(base_cfg(vae_stats), base_dir, base_params)
        return r

    runs = {"base": run_stage(workdir, "base", base_stage)}
    for s in range(int(hp["seeds"])):
        for arm, (task, ratio) in ARMS.items():
            name = f"{arm}_s{s}"
            cfg = study_config(hp, vae_stats, stage="arms", seed=s, init_from=base_params)
            a = hp["arms"]
            runs[name] = run_stage(workdir, f"arm_{name}", lambda cfg=cfg, name=name, task=task, ratio=ratio:
                                   lib.train_run(cfg, os.path.join(workdir, "arms", name), n_vqa=a["n_vqa"],
                                                 n_gen=ratio * a["n_vqa"], gen_task=task or "t2i",
                                                 data_seed=100 + s))
    evals = {}
    for name in runs:
        run_dir = base_dir if name == "base" else os.path.join(workdir, "arms", name)
        cfg = study_config(hp, vae_stats, stage="arms", init_from=base_params)
        evals[name] = run_stage(workdir, f"eval_{name}", lambda cfg=cfg, run_dir=run_dir, name=name:
                                ev.evaluate_run(cfg, run_dir, hp["eval"], analyses=name in ANALYSIS_RUNS))
    report = args.report or (os.path.join(workdir, "toy_sgt.md") if args.quick else
                             os.path.join(HERE, "results", "toy_sgt.md"))
    write_report(report, workdir=workdir, hp=hp, quick=args.quick, vae=vae_stats, runs=runs, evals=evals,
                 arms=ARMS, stage_seconds=stage_seconds(workdir), wall_this_call=time.time() - t_start,
                 command=" ".join(["python", "bench/toy_sgt.py"] + (argv if argv is not None else sys.argv[1:])))
    print(f"[toy_sgt] report -> {report} ({time.time() - t_start:.1f} s this call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
