"""OmniGen2's sampler: the Euler flow scheduler with its dynamic shift and the three-way CFG.

Official code (VectorSpaceLab/OmniGen2): ``omnigen2/schedulers/scheduling_flow_match_euler_discrete.py``
(OmniGen2's own ``FlowMatchEulerDiscreteScheduler``, not diffusers') and the denoising loop of
``omnigen2/pipelines/omnigen2/pipeline_omnigen2.py``.

Convention (OmniGen2's, the opposite of BAGEL's sgt_jax/sampling/flow.py): t = 0 is pure noise, t = 1 is
data; the model predicts v = x₁ − x₀ and Euler steps go *up* in t: ``x <- x + (t_{i+1} − t_i)·v``.

* Schedule: ``t_i = linspace(0, 1, N+1)[:-1]``, shifted by ``t' = t / (m − m·t + t)`` with
  ``m = sqrt(num_tokens) / 40`` where ``num_tokens`` is the number of *latent pixels* H_lat·W_lat
  (not patch tokens), then a final 1.0 appended: N model evaluations.
* The model sees ``t`` cast to the latents' dtype (bf16 in a bf16 run; nothing changes in fp32).
* The update runs in fp32 and is cast back to the velocity's dtype.
* CFG at step i is active iff ``cfg_range[0] <= i/N <= cfg_range[1]`` (step-index fraction, both ends
  inclusive). Active and text scale tg > 1:
  - with reference images and image scale ig > 1: three passes, ``v = v_u + ig·(v_r − v_u) + tg·(v_c − v_r)``
    (v_c: prompt + refs; v_r: negative prompt + refs; v_u: negative prompt, no refs);
  - otherwise two passes, ``v = v_u + tg·(v_c − v_u)`` where v_u has the negative prompt and no refs
    even when the sample has refs.
  tg <= 1 or inactive: only v_c.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


def timesteps(num_steps: int, num_tokens: int) -> np.ndarray:
    """The ``N + 1`` fp32 times ``t_0 = 0 < ... < t_N = 1`` for ``num_tokens`` latent pixels (H_lat·W_lat)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    t = np.linspace(0.0, 1.0, num_steps + 1, dtype=np.float32)[:-1]
    m = np.float32(np.sqrt(num_tokens) / 40.0)
    t = t / (m - m * t + t)
    return np.concatenate([t, np.ones(1, np.float32)]).astype(np.float32)


class Guidance(NamedTuple):
    """Which passes step i needs and how they combine (see the module docstring)."""

    passes: tuple[str, ...]  # subset of ("cond", "neg_refs", "uncond") in this order
    text_scale: float
    image_scale: float


def guidance(step: int, num_steps: int, text_scale: float, image_scale: float, has_refs: bool,
             cfg_range: tuple[float, float] = (0.0, 1.0)) -> Guidance:
    """The official pipeline's branch choice for step ``step`` of ``num_steps``."""
    frac = step / num_steps
    active = cfg_range[0] <= frac <= cfg_range[1]
    if not active or text_scale <= 1.0:
        return Guidance(("cond",), 1.0, 1.0)
    if has_refs and image_scale > 1.0:
        return Guidance(("cond", "neg_refs", "uncond"), float(text_scale), float(image_scale))
    return Guidance(("cond", "uncond"), float(text_scale), 1.0)


def combine(g: Guidance, v: dict) -> jnp.ndarray:
    """The guided velocity from the passes of ``g`` (``v`` maps pass name -> velocity)."""
    if g.passes == ("cond",):
        return v["cond"]
    if "neg_refs" in g.passes:
        return v["uncond"] + g.image_scale * (v["neg_refs"] - v["uncond"]) + g.text_scale * (v["cond"] - v["neg_refs"])
    return v["uncond"] + g.text_scale * (v["cond"] - v["uncond"])


def euler_step(x, v, t, t_next):
    """``x + (t_next − t)·v`` in fp32, cast to v's dtype (OmniGen2's scheduler ``step``)."""
    dt = jnp.float32(t_next) - jnp.float32(t)
    return (x.astype(jnp.float32) + dt * v.astype(jnp.float32)).astype(v.dtype)


def denoise_step(velocity: Callable, x, step: int, ts: np.ndarray, *, text_scale: float, image_scale: float,
                 has_refs: bool, cfg_range=(0.0, 1.0)):
    """One step of the official loop. ``velocity(x, t, which)`` evaluates the model for pass ``which``
    ("cond": prompt + refs, "neg_refs": negative prompt + refs, "uncond": negative prompt, no refs) at
    times ``t`` (already cast to x's dtype here). Returns the next latents."""
    return _step(lambda xx, t, passes: {name: velocity(xx, t, name) for name in passes}, x, step, ts,
                 text_scale, image_scale, has_refs, cfg_range)


def _step(velocities: Callable, x, step, ts, text_scale, image_scale, has_refs, cfg_range):
    g = guidance(step, len(ts) - 1, text_scale, image_scale, has_refs, cfg_range)
    t = jnp.full((x.shape[0],), ts[step], jnp.float32).astype(x.dtype)
    return euler_step(x, combine(g, velocities(x, t, g.passes)), ts[step], ts[step + 1])


def denoise(velocities: Callable, x, ts: np.ndarray, *, text_scale: float, image_scale: float, has_refs: bool,
            cfg_range=(0.0, 1.0), progress: Callable | None = None):
    """The whole official denoising loop: ``len(ts) - 1`` Euler steps from the noise ``x`` (t = 0) to the
    data end (t = 1). ``velocities(x, t, passes)`` returns ``{pass: velocity}`` for the passes of one step
    (so that a caller can evaluate them in one stacked model call); ``progress(i)`` is called after each
    step. Returns the final latents."""
    for i in range(len(ts) - 1):
        x = _step(velocities, x, i, ts, text_scale, image_scale, has_refs, tuple(cfg_range))
        if progress is not None:
            progress(i)
    return x
