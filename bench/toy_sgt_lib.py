"""Pieces of the small-scale SGT ablation (bench/toy_sgt.py): the VAE pre-training, the init/export of the
shared checkpoints, the fixed-count data iterator and the held-out evaluations.

Everything here is study-specific glue over the project's own code (configs/bagel_sgt.py:small, the
synthetic world, sgt_jax.data.plans/packing, sgt_jax.train.loop, sgt_jax.sampling, sgt_jax.eval); the
reusable parts live in sgt_jax/eval/shapes_detector.py and sgt_jax/eval/bootstrap.py.
"""

from __future__ import annotations

import json
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sgt_jax.data import plans, proxy_tasks, synthetic, templates
from sgt_jax.data.packing import BatchLayout, assemble_batch, efficiency, pack_plans
from sgt_jax.data.tokenizer import get_tokenizer
from sgt_jax.data.transforms import Transforms, normalize

# Held-out scene index ranges (training uses 0 .. num_samples-1 of the same world).
MCQ_START, GEN_START, SEG_START = 100_000, 150_000, 100_000
MCQ_KINDS = ("count", "position", "size", "colour", "exists")  # CV-Bench: count, relation, depth/size, ...


def world_of(config) -> synthetic.WorldConfig:
    return synthetic.WorldConfig.from_config(config.data.sources.synthetic)


# ---------------------------------------------------------------------------------------------------
# VAE pre-training (the random VAE of the small config reconstructs nothing)
# ---------------------------------------------------------------------------------------------------

def _images(world, start: int, n: int) -> np.ndarray:
    return np.stack([normalize(synthetic.render_scene(synthetic.make_scene(world, start + i))[0]) for i in range(n)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def train_vae(config, *, steps: int, batch: int, lr: float, kl_weight: float, seed: int, eval_n: int) -> dict:
    """Trains the config's FluxVAE on the world's training scenes (MSE + kl_weight * KL, Adam).

    Returns {"params": pure dict, "psnr_random", "psnr", "latent_mean", "latent_std", "losses"}; PSNR on
    ``eval_n`` held-out scenes with posterior-mean latents."""
    from sgt_jax.models.flux_vae import FluxVAE

    world = world_of(config)
    vae = FluxVAE(config.model.vae, rngs=nnx.Rngs(seed))
    held = _images(world, MCQ_START + 50_000, eval_n)

    @nnx.jit
    def recon(v, x):
        mean, _ = v.encode_stats(x)
        return v.decode(mean), mean

    psnr_random = psnr(np.asarray(recon(vae, held)[0]), held)
    opt = nnx.Optimizer(vae, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(v, o, x, key):
        def loss_fn(m):
            mean, logvar = m.encode_stats(x)
            z = m.sample(mean, logvar, key)
            rec = jnp.mean((m.decode(z) - x) ** 2)
            kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
            return rec + kl_weight * kl, rec

        (loss, rec), grads = nnx.value_and_grad(loss_fn, has_aux=True)(v)
        o.update(v, grads)
        return loss, rec

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    losses = []
    for s in range(steps):
        idx = rng.integers(0, world.num_samples, size=batch)
        x = np.stack([normalize(synthetic.render_scene(synthetic.make_scene(world, int(i)))[0]) for i in idx])
        key, sub = jax.random.split(key)
        _, rec = step(vae, opt, jnp.asarray(x), sub)
        losses.append(float(rec))
    out, means = recon(vae, held)
    means = np.asarray(means)
    return dict(params=jax.device_get(nnx.state(vae, nnx.Param).to_pure_dict()), psnr_random=psnr_random,
                psnr=psnr(np.asarray(out), held), latent_mean=float(means.mean()), latent_std=float(means.std()),
                losses=losses, held=held, recon=np.asarray(out))


# ---------------------------------------------------------------------------------------------------
# Shared checkpoints: random init + trained VAE -> imported workdir; a training run -> imported workdir
# ---------------------------------------------------------------------------------------------------

def write_init(config, vae_params: dict, dest: str) -> None:
    """The model's own random init (seed config.train.seed) with the trained VAE, as an imported workdir."""
    from sgt_jax import parallel
    from sgt_jax.checkpoint import store
    from sgt_jax.train import state as state_lib

    mesh = parallel.make_mesh(config.mesh)
    spec = state_lib.make_state_spec(config, mesh)
    st = state_lib.init_state(config, spec)
    full = state_lib.full_params_from_state(spec, st)
    target = state_lib.full_param_target(spec)
    full["vae"] = jax.tree.map(lambda v, t: jax.device_put(np.asarray(v, t.dtype), t.sharding), vae_params,
                               target["vae"])
    os.makedirs(dest, exist_ok=True)
    store.save_params(dest, full, {"layout": {"scan_layers": bool(config.model.scan_layers)},
                                   "source": {"kind": "toy_sgt init"}})


def export_run(config, run_dir: str, dest: str, weights: str = "raw") -> None:
    """The final parameters of a training run as an imported workdir (what the arms start from)."""
    from sgt_jax.checkpoint import store
    from sgt_jax.sampling.loading import abstract_model_and_params

    _, target, _ = abstract_model_and_params(config)
    params = store.load_for_inference(run_dir, weights=weights, abstract_params=target)
    os.makedirs(dest, exist_ok=True)
    store.save_params(dest, params, {"layout": {"scan_layers": bool(config.model.scan_layers)},
                                     "source": {"kind": "toy_sgt export", "run": os.path.abspath(run_dir)}})


# ---------------------------------------------------------------------------------------------------
# Fixed-count data: every step holds exactly n_vqa VQA samples and n_gen generation samples
# ---------------------------------------------------------------------------------------------------

class FixedCountIterator:
    """Host batches with exactly ``n_vqa`` VQA and ``n_gen`` generation samples per step (all in the
    batch's packs; an overflow is an error, the budgets are sized for it).

    ``gen_task``: "t2i" (caption -> scene), or a proxy task of config.data.proxy_task's kind
    ("segmentation", "reconstruction", "edge"). Sample j of a group at step s is the scene at position
    s*n + j of that group's per-epoch permutation of the world's training scenes (seed ``data_seed``), so
    two runs with the same data_seed and n_vqa see the same VQA samples at every step, whatever their
    generation task. State: the step index (exact resume)."""

    def __init__(self, config, *, n_vqa: int, n_gen: int, gen_task: str, data_seed: int):
        self.config, self.n_vqa, self.n_gen, self.gen_task = config, int(n_vqa), int(n_gen), gen_task
        if gen_task != "t2i":
            proxy_tasks.task_of(gen_task)
        self.seed = int(data_seed)
        self.world = world_of(config)
        self.tok = get_tokenizer(config)
        self.tfm = Transforms.from_config(config)
        self.layout = BatchLayout.from_config(config)
        self.packs = int(config.data.packs_per_batch)
        self.dropout = float(config.data.text_cond_dropout)
        self.step = 0
        self._perm_cache = {}
        self._eff = {}

    def _index(self, group: int, g: int) -> int:
        n = self.world.num_samples
        epoch = g // n
        if self._perm_cache.get(group, (None,))[0] != epoch:
            self._perm_cache[group] = (epoch, np.random.default_rng([self.seed, group, epoch]).permutation(n))
        return int(self._perm_cache[group][1][g % n])

    def _gen_plan(self, idx: int, g: int) -> dict:
        rng = np.random.default_rng([self.seed, 0x6E1, g])
        drop = bool(rng.random() < self.dropout)
        if self.gen_task == "t2i":
            scene = synthetic.make_scene(self.world, idx)
            image = synthetic.render_scene(scene)[0]
            return plans.t2i_plan(synthetic.caption(scene), image, scene.key, "synthetic", self.tok, self.tfm,
                                  drop_text=drop)
        s = synthetic.seg_sample(self.world, idx)
        if self.gen_task != "segmentation":
            s = proxy_tasks.make_proxy_sample(s["image"], s["key"], s["source"], self.gen_task, self.seed)
        options = templates.templates_for(s["task"])
        return plans.sgt_plan(s, options[int(rng.integers(len(options)))], self.tok, self.tfm, drop_text=drop)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        todo = []
        for j in range(self.n_vqa):
            g = self.step * self.n_vqa + j
            todo.append(plans.vqa_plan(synthetic.vqa_sample(self.world, self._index(1, g)), self.tok, self.tfm))
        for j in range(self.n_gen):
            g = self.step * self.n_gen + j
            todo.append(self._gen_plan(self._index(2, g), g))
        where = pack_plans(todo, self.packs, self.layout.budget)
        if where is None:
            raise ValueError(f"toy_sgt: {self.n_vqa} VQA + {self.n_gen} {self.gen_task} samples of step {self.step} "
                             f"do not fit {self.packs} pack(s) of {self.layout.budget}")
        packs = [[p for p, j in zip(todo, where) if j == i] for i in range(self.packs)]
        batch = assemble_batch(packs, self.layout)
        for k, v in efficiency(batch, self.layout.budget).items():
            self._eff[k] = self._eff.get(k, 0.0) + v
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step, "efficiency_sum": dict(self._eff)}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self._eff = dict(state.get("efficiency_sum", {}))

    def stats(self) -> dict:
        return {"steps": self.step, "n_vqa_per_step": self.n_vqa, "n_gen_per_step": self.n_gen,
                "gen_task": self.gen_task,
                "efficiency": {k: v / max(self.step, 1) for k, v in self._eff.items()}}

    def close(self) -> None:
        pass


def train_run(config, workdir: str, *, n_vqa: int, n_gen: int, gen_task: str, data_seed: int) -> dict:
    """One resumable training run of sgt_jax.train.loop with the fixed-count iterator; returns its metrics."""
    from sgt_jax.train import loop

    def iterator_fn(cfg, process_index=0, process_count=1):
        del process_index, process_count
        return FixedCountIterator(cfg, n_vqa=n_vqa, n_gen=n_gen, gen_task=gen_task, data_seed=data_seed)

    t0 = time.time()
    loop.run(config, types.SimpleNamespace(workdir=workdir), iterator_fn=iterator_fn)
    return dict(seconds=time.time() - t0, metrics=read_metrics(workdir))


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_step[int(r["step"])] = {k: r.get(k) for k in ("step", "loss", "ce", "mse", "step_time_s")}
    return [by_step[s] for s in sorted(by_step)]
