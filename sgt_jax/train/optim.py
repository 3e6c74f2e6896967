"""Optimizer, learning-rate schedule and EMA (song2yu/SGT `BAGEL/shells/train_sgt.sh`, ByteDance-Seed/Bagel `train/pretrain_unified_navit.py`).

AdamW (b1 0.9, b2 0.95, eps 1e-15, weight decay 0) after a global-L2-norm clip of 1.0; learning rate
linear warm-up from 0 then constant (SGT) or cosine to ``min_lr``. The optimizer sees only the
trainable parameters (frozen ones are not inputs to it), in fp32.

EMA: ``ema <- decay·ema + (1 − decay)·params`` after every applied update, over the trainable
parameters only (BAGEL updates only ``requires_grad`` parameters). The arithmetic runs in fp32 and is
stored in ``config.train.ema_dtype`` (bf16 halves its memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")
MU_DTYPES = ("float32", "bfloat16")


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then constant or cosine to ``min_lr``."""
    lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    kind = str(optim_cfg.schedule)
    if kind not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={kind!r}; allowed: {SCHEDULES}")
    if warmup < 0 or lr <= 0:
        raise ValueError(f"config.optim: lr must be > 0 and warmup_steps >= 0 (got {lr}, {warmup})")
    # BAGEL's get_constant_schedule_with_warmup: lr·min(1, step/warmup), step counted from 0.
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1)) if warmup else optax.constant_schedule(lr)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        decay_steps = max(int(total_steps) - warmup, 1)
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim_cfg.min_lr) / lr)
    return optax.join_schedules([warm, after], [warmup]) if warmup else after


def chain_parts(clip_norm: float, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm(clip_norm), inner)``, without the clip when ``clip_norm`` is 0."""
    return optax.chain(*([optax.clip_by_global_norm(clip_norm)] if clip_norm else []), inner)


def optimizer_parts(optim_cfg, total_steps: int) -> tuple[float, optax.GradientTransformation, optax.Schedule]:
    """``(clip_norm, inner, schedule)``: the global-norm clip (0 = none) and the AdamW transformation after
    it. The train step's optimizer is ``chain_parts(clip_norm, inner)``; the parts stay apart for updates
    applied one slice at a time (sgt_jax/train/offload.py clips each slice by the global norm itself)."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    clip_norm = float(optim_cfg.clip_norm) if optim_cfg.clip_norm and float(optim_cfg.clip_norm) > 0 else 0.0
    mu_dtype = str(optim_cfg.mu_dtype)
    if mu_dtype not in MU_DTYPES:
        raise ValueError(f"config.optim.mu_dtype={mu_dtype!r}; allowed: {MU_DTYPES}")
    inner = optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                        weight_decay=float(optim_cfg.weight_decay), mu_dtype=jnp.dtype(mu_dtype))
    return clip_norm, inner, schedule


def ema_update(ema, params, decay: float):
    """One EMA step in fp32, stored back in each EMA leaf's dtype."""

    def one(e, p):
        e32 = e.astype(jnp.float32)
        return (e32 + (1.0 - decay) * (p.astype(jnp.float32) - e32)).astype(e.dtype)

    return jax.tree.map(one, ema, params)
