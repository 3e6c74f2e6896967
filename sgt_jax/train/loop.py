"""The training loop: ``python -m sgt_jax.main --config configs/sgt_tiny.py --workdir runs/tiny``.

Order of events (each one fails loudly, before any long compile where possible):
  1. multi-process start-up (``jax.distributed``) and the platform check (config.train.platform);
  2. mesh + rules from config; abstract train state; the replicated-bytes check on the parameters;
  3. data iterator for this process (its rows of the global batch);
  4. state: own newest valid checkpoint > config.checkpoint.init_from > random init; iterator state too;
  5. AOT compile of the step on the first batch; compiled memory per device is printed;
  6. steps: host batch -> global arrays (both on a background thread, config.train.prefetch batches
     ahead: sgt_jax/train/overlap.py) -> step -> metrics line (+ TensorBoard) -> checkpoint every K;
     with config.train.overlap a step's metrics are read after the next step is dispatched, so the
     devices never wait for the host's logging; a NaN/Inf loss or gradient skips the update inside the
     step; K in a row abort the run (noticed one step later when overlapped);
  7. SIGTERM/SIGINT: save the current step and exit cleanly (the flag is combined over processes every
     config.train.stop_check_every steps: the only host collective of the loop); at the end: final
     checkpoint, optional export to a BAGEL PyTorch folder, summary.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sgt_jax import parallel
from sgt_jax.checkpoint import convert, store
from sgt_jax.mode_args import ModeArgs
from sgt_jax.train import checkpointing, metrics as metrics_lib
from sgt_jax.train import flops as flops_lib
from sgt_jax.train import overlap as overlap_lib
from sgt_jax.train import state as state_lib
from sgt_jax.train import step as step_lib
from sgt_jax.train.family import family
from sgt_jax.train.family import iterator_fn as family_iterator_fn
from sgt_jax.train.freeze import flops_frozen_modules

log = logging.getLogger(__name__)


class NonFiniteAbort(RuntimeError):
    """Raised after ``config.train.max_consecutive_nonfinite`` skipped steps in a row."""


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass

    def _handler(self, signum, frame):
        del frame
        self.signal = signum
        log.warning("received signal %d: saving a checkpoint and stopping after this step", signum)

    def uninstall(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_process(self) -> bool:
        mine = self.signal is not None
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray([mine]))))


def _global_rows(rows: np.ndarray, mesh, rules) -> jax.Array:
    """This process's per-pack bookkeeping rows as a global array split like the batch (no host collective:
    the sum over processes runs on the devices, read back with the step's metrics)."""
    sharding = parallel.batch_sharding(mesh, rules)
    return jax.make_array_from_process_local_data(sharding, rows, (rows.shape[0] * jax.process_count(),)
                                                  + rows.shape[1:])


class _Profile:
    """A jax.profiler trace of steps ``first..last`` (config.train.profile_steps) into <workdir>/profile."""

    def __init__(self, first: int, last: int, logdir: str):
        self.first, self.last, self.logdir, self.active = first, last, logdir, False

    def before(self, step: int) -> None:
        if step == self.first and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.last:
            self.close()
            print(f"profiler trace of steps {self.first}-{self.last}: {self.logdir}")

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def _profile_window(tc, workdir: str) -> _Profile:
    window = tuple(tc.profile_steps or ())
    if not window:
        return _Profile(-1, -1, "")
    if len(window) != 2 or not 1 <= int(window[0]) <= int(window[1]):
        raise ValueError(f"config.train.profile_steps={window!r}: expected (first, last) with 1 <= first <= last, "
                         "or () for no trace")
    return _Profile(int(window[0]), int(window[1]), os.path.join(workdir, "profile"))


def _crc(host: dict) -> int:
    """A fingerprint of this process's host batch (token ids + generation targets): data order is checkable."""
    import zlib

    target = host["latent_target"] if "latent_target" in host else host["target_images"]  # BAGEL / OmniGen2
    return zlib.crc32(np.ascontiguousarray(host["tokens"]).tobytes()) ^ zlib.crc32(
        np.ascontiguousarray(target).tobytes())


def _flops_per_step(config, global_packs: int) -> float | None:
    """Model FLOPs of one step for MFU: BAGEL's analytic count (sgt_jax/train/flops.py) over the step's packs;
    OmniGen2's 6·N·tokens estimate over its static row budgets (sgt_jax/train/omnigen2_flops.py, the
    ``data.packs_per_batch`` samples of a step)."""
    if family(config) == "omnigen2":
        from sgt_jax.train import omnigen2_flops

        return omnigen2_flops.model_flops(config)["total"]
    budgets = flops_lib.budgets_from_config(config)
    return flops_lib.step_flops(config.model, budgets, packs=global_packs, frozen=flops_frozen_modules(config),
                                vae_online=state_lib.latents_online(config)).total


def _peak_flops(config) -> float | None:
    """Per-device peak FLOP/s for MFU: config.train.peak_flops, else the TPU chip from the device kind."""
    peak = float(config.train.peak_flops)
    if peak > 0:
        return peak
    chip = flops_lib.chip_from_device_kind(jax.devices()[0].device_kind)
    return chip.peak_bf16_flops if chip else None


def _print_memory(compiled) -> None:
    try:
        mem = compiled.memory_analysis()
    except Exception as err:  # noqa: BLE001 - some backends do not implement it
        print(f"compiled memory analysis unavailable: {err}")
        return
    if mem is None:
        print("compiled memory analysis unavailable on this backend")
        return
    gib = 2**30
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    parts = {f.replace("_size_in_bytes", ""): getattr(mem, f, 0) / gib for f in fields}
    total = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    print("compiled memory per device (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
          + f"; total ~{total:.3f}")


def _restore_data_state(iterator, data: dict, reshard: bool = False) -> None:
    n, pi = jax.process_count(), jax.process_index()
    states = data["states"]
    if data["process_count"] != n and all(s == states[0] for s in states):
        iterator.set_state(states[0])  # a layout-independent state (the same on every process)
        return
    if data["process_count"] != n:
        resharder = getattr(iterator, "reshard_states", None)
        if reshard and resharder is not None:
            state, skipped = resharder(states, pi, n)
            log.warning("data iterator resharded from %d to %d processes: the data order continues from the "
                        "furthest position read; %d samples below it were not yet read and are skipped this "
                        "epoch (config.data.reshard_on_resume)", data["process_count"], n, skipped)
            iterator.set_state(state)
            return
        raise ValueError(
            f"the checkpoint's data-iterator state was written by {data['process_count']} processes, this run has "
            f"{n}: the data order cannot be resumed exactly. Resume with {data['process_count']} processes, or "
            "set --config.data.reshard_on_resume=True to continue from the furthest position read (the samples "
            "a slower process had not reached yet are skipped for this epoch, and counted in the log).")
    iterator.set_state(data["states"][pi])


def run(config, args, *, model_fn: Callable | None = None, iterator_fn: Callable | None = None) -> int:
    """Train ``config`` in ``args.workdir``. ``model_fn``/``iterator_fn`` override the model and the data
    iterator (tests); by default the family's (``config.model.family``, sgt_jax/train/family.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO through absl
    parallel.maybe_initialize(config)
    parallel.check_platform(config)
    workdir = args.workdir
    os.makedirs(workdir, exist_ok=True)
    tc = config.train
    total_steps = int(tc.steps)
    every = int(config.checkpoint.every)
    if total_steps < 0 or every <= 0:
        raise ValueError(f"config.train.steps must be >= 0 and config.checkpoint.every > 0 "
                         f"(got {total_steps}, {every})")

    _check_export_at_end(config)
    overlap, prefetch = bool(tc.overlap), int(tc.prefetch)
    check_every = int(tc.stop_check_every)
    if check_every < 1 or prefetch < 0:
        raise ValueError(f"config.train.stop_check_every must be >= 1 and config.train.prefetch >= 0 (got "
                         f"{check_every}, {prefetch})")
    profile = _profile_window(tc, workdir)

    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)
    spec, jitted, _ = step_lib.build(config, mesh, model_fn)
    parallel.check_sufficiently_sharded({"params": spec.abstract["params"], "frozen": spec.abstract["frozen"]},
                                        mesh, rules, float(config.mesh.max_replicated_fraction))

    if iterator_fn is None:
        iterator_fn = family_iterator_fn(config)
    iterator = iterator_fn(config, process_index=jax.process_index(), process_count=jax.process_count())

    manager = store.make_manager(workdir, keep=int(config.checkpoint.keep),
                                 async_save=bool(config.checkpoint.async_save))
    state, data = checkpointing.restore_state(manager, spec, config, mesh)
    if state is None:
        state = checkpointing.initial_state(config, spec, mesh)
    else:
        _restore_data_state(iterator, data, bool(config.data.reshard_on_resume))
    start = int(jax.device_get(state["step"]))
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices, "
          f"{jax.process_count()} process(es); starting at step {start} of {total_steps}")
    if start >= total_steps:
        print(f"nothing to train: the checkpoint is at step {start} >= config.train.steps={total_steps}")

    writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(tc.tensorboard), resume_step=start)
    stop = _StopFlag()
    stop.install()
    max_bad = int(tc.max_consecutive_nonfinite)
    count_sum = jax.jit(lambda c: c.sum(axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))

    def to_device(host):
        """On the prefetch thread: transfers only. Every computation (the step, the count sum) is
        dispatched by the main thread, so all processes launch their programs in the same order."""
        rows = np.stack([np.asarray(host.get(k, np.zeros(len(host["tokens"]), np.int32)), np.int32)
                         for k in ("n_seg", "n_vqa")], axis=-1)
        return parallel.to_global(host, mesh, rules), _global_rows(rows, mesh, rules)

    prefetcher = overlap_lib.Prefetcher(iterator, to_device, prefetch)
    clock = overlap_lib.DeviceClock()
    compiled = None
    totals = {"n_seg": 0, "n_vqa": 0, "flops": None, "peak": None, "t_read": None}
    last_saved = start if manager.latest_step() == start else None
    times = []
    data_stats = None
    step = start
    pending = None

    def finish(p):
        """Read a dispatched step's metrics (blocks until it ran), log them, check the NaN counter."""
        m, counts = jax.device_get((p["metrics"], p["counts"]))
        now = time.time()
        dt = now - (totals["t_read"] if totals["t_read"] is not None else p["t_dispatch"])
        totals["t_read"] = now
        times.append(dt)
        seg, vqa = int(counts[0]), int(counts[1])
        totals["n_seg"] += seg
        totals["n_vqa"] += vqa
        flops, peak = totals["flops"], totals["peak"]
        record = {k: (bool(v) if k == "applied" else float(v) if np.ndim(v) == 0 else v) for k, v in m.items()}
        record.update(batch_crc=p["crc"], step_time_s=dt, tokens_per_s=p["tokens"] / dt, n_seg=seg, n_vqa=vqa,
                      seg_vqa_ratio=(totals["n_seg"] / totals["n_vqa"]) if totals["n_vqa"] else None,
                      tflops_per_device=(flops / dt / jax.device_count() / 1e12) if flops else None,
                      mfu=(flops / (dt * jax.device_count() * peak)) if flops and peak else None)
        writer.write(p["step"], record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", ce=f"{record['ce']:.3f}", mse=f"{record['mse']:.3f}")
        profile.after(p["step"])
        if int(m["nonfinite"]) >= max_bad:
            raise NonFiniteAbort(
                f"{int(m['nonfinite'])} consecutive steps had a NaN/Inf loss or gradient (last at step {p['step']}); "
                f"updates were skipped, aborting (config.train.max_consecutive_nonfinite={max_bad}). Last "
                f"loss {record['loss']}, grad_norm {record['grad_norm']}.")

    try:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
        while step < total_steps:
            item = next(prefetcher)
            batch, counts = item.batch
            if compiled is None:
                t0 = time.time()
                compiled = jitted.lower(state, batch).compile()
                print(f"compiled the train step in {time.time() - t0:.1f} s")
                _print_memory(compiled)
                global_packs = int(batch["tokens"].shape[0])
                totals["flops"], totals["peak"] = _flops_per_step(config, global_packs), _peak_flops(config)
            profile.before(step + 1)
            t_dispatch = time.time()
            state, m = compiled(state, batch)
            counts = count_sum(counts)
            clock.dispatched(m)
            step += 1
            current = dict(step=step, metrics=m, counts=counts, crc=_crc(item.host), t_dispatch=t_dispatch,
                           tokens=int(np.prod(batch["tokens"].shape)))
            if pending is not None:  # overlapped: the previous step's metrics, while this one runs
                finish(pending)
            pending = current
            if not overlap:
                finish(pending)
                pending = None
            # one process: the local flag every step; several: a collective every check_every steps only
            check = jax.process_count() == 1 or step % check_every == 0 or step == total_steps
            stopping = check and stop.any_process()
            if step % every == 0 or step == total_steps or stopping:
                checkpointing.save_state(manager, state, data_state=item.data_state, config=config, mesh=mesh,
                                         force=True)
                last_saved = step
            if stopping:
                if pending is not None:
                    finish(pending)
                    pending = None
                print(f"stopped by signal at step {step}; checkpoint saved")
                break
        if pending is not None:
            finish(pending)
            pending = None
        bar.close()
    finally:
        profile.close()
        clock.close()
        prefetcher.close()
        stop.uninstall()
        store.wait(manager)
        manager.close()
        writer.close()
        if hasattr(iterator, "stats"):
            try:
                data_stats = iterator.stats()
            except Exception as err:  # noqa: BLE001 - stats are informative only
                data_stats = f"unavailable: {err}"
        if hasattr(iterator, "close"):
            iterator.close()
    if step == total_steps and str(config.checkpoint.export_at_end):
        _export(config, workdir, step)
    steady = times[1:] if len(times) > 1 else times
    n_seg, n_vqa = totals["n_seg"], totals["n_vqa"]
    summary = {
        "steps_run": len(times), "final_step": step, "last_checkpoint": last_saved,
        "mean_step_time_s": float(np.mean(steady)) if steady else None,
        "steps_per_s": clock.steps_per_s(), "device_wait_fraction": clock.wait_fraction(),
        "skipped_steps": int(jax.device_get(state["skipped"])), "n_seg": n_seg, "n_vqa": n_vqa,
        "seg_vqa_ratio": (n_seg / n_vqa) if n_vqa else None,
    }
    print("summary: " + ", ".join(f"{k}={v}" for k, v in metrics_lib.rounded(summary).items()))
    if data_stats:
        print(f"data: {metrics_lib.rounded(data_stats)}")
    return 0


def _check_export_at_end(config) -> None:
    """Refuse before training what the export at the end could not do (not after hours of steps)."""
    weights = str(config.checkpoint.export_at_end)
    if not weights:
        return
    if weights not in ("ema", "raw"):
        raise ValueError(f"config.checkpoint.export_at_end={weights!r}; allowed: '', 'ema', 'raw'")
    if weights == "ema" and float(config.train.ema_decay) <= 0.0:
        raise ValueError("config.checkpoint.export_at_end='ema' but the run keeps no EMA (config.train.ema_decay "
                         "is 0); export 'raw' or set an EMA decay")

    init_from = str(config.checkpoint.init_from)
    if not state_lib.latents_online(config) and not convert.vae_available(init_from):
        raise ValueError(
            f"config.checkpoint.export_at_end={weights!r}: a cached-latent run keeps no VAE in its checkpoints, "
            f"and config.checkpoint.init_from ({init_from!r}) leads to no ae.safetensors or imported params to "
            "take it from. Start from a BAGEL folder or an imported workdir, or export later with --mode export.")


def _export(config, workdir: str, step: int) -> None:
    """Write the EMA or raw weights of the final checkpoint as a BAGEL PyTorch folder."""
    dest = str(config.checkpoint.export_dir) or os.path.join(workdir, "export")
    # export_at_end was validated by _check_export_at_end before step 0
    convert.run_export(config, ModeArgs(workdir=workdir, dest=dest, step=step,
                                        weights=str(config.checkpoint.export_at_end)))
