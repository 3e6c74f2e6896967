"""Flow-matching sampling math for BAGEL image generation (ByteDance-Seed/Bagel `modeling/bagel/bagel.py` `generate_image`).

Pure functions of arrays, no model: the timestep schedule with shift, the CFG interval rule and the
three CFG renormalisation types. They are kept separate from the model calls so that each can be
tested against a plain numpy reference written from the spec.

Conventions (BAGEL's): t = 1 is pure noise, t = 0 is data; the model predicts the velocity
v = eps - x0, and Euler steps go from noise to data with ``x <- x - v * dt``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

RENORM_TYPES = ("global", "channel", "text_channel")


def shift_timesteps(t, shift: float):
    """BAGEL's timestep shift ``s*t / (1 + (s-1)*t)``; ``shift == 1`` is the identity."""
    if shift <= 0:
        raise ValueError(f"timestep_shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def timestep_schedule(num_timesteps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's (t_i, dt_i) for i = 0..N-2 (N-1 model evaluations).

    ``t = linspace(1, 0, N)`` shifted; ``dt_i = t_i - t_{i+1}``. The last grid point (t = 0) is never
    evaluated, exactly as in BAGEL's ``generate_image``. Returned as float32 numpy arrays (static data:
    the jitted step receives one (t, dt) pair at a time, so the schedule length never causes a retrace).
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2 (N-1 Euler steps), got {num_timesteps}")
    t = shift_timesteps(np.linspace(1.0, 0.0, num_timesteps, dtype=np.float64), shift)
    return t[:-1].astype(np.float32), (t[:-1] - t[1:]).astype(np.float32)


def cfg_active(t: float, interval: tuple[float, float]) -> bool:
    """CFG applies only where ``interval[0] < t <= interval[1]`` (t is the *shifted* timestep)."""
    lo, hi = interval
    return bool(lo < t <= hi)


class CfgSettings(NamedTuple):
    """The guidance settings of one generation (all host-side Python values)."""

    text_scale: float = 4.0
    img_scale: float = 1.0
    interval: tuple[float, float] = (0.4, 1.0)
    renorm_type: str = "global"
    renorm_min: float = 0.0

    def validate(self) -> "CfgSettings":
        if self.renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type {self.renorm_type!r} is not one of {RENORM_TYPES} "
                             "(BAGEL's 'local' was never implemented)")
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.interval}")
        if not 0.0 <= self.renorm_min <= 1.0:
            raise ValueError(f"cfg_renorm_min must be in [0, 1], got {self.renorm_min}")
        if self.text_scale < 0 or self.img_scale < 0:
            raise ValueError(f"CFG scales must be >= 0, got text {self.text_scale}, img {self.img_scale}")
        return self

    def scales_at(self, t: float) -> tuple[float, float]:
        """(text_scale, img_scale) effective at shifted timestep ``t`` (both 1 outside the interval)."""
        if cfg_active(t, self.interval):
            return float(self.text_scale), float(self.img_scale)
        return 1.0, 1.0


def _norm(x, axis):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))


def combine_cfg(v_c, v_t, v_i, text_scale, img_scale, renorm_type: str, renorm_min):
    """Combine the three velocity predictions with BAGEL's guidance + renorm (ByteDance-Seed/Bagel `modeling/bagel/bagel.py` `_forward_flow`).

    Args:
      v_c, v_t, v_i: [..., Z, C] velocities from the full, cfg-text and cfg-img contexts. The last two
        axes are (latent token, channel); "global" takes its norm over both, per leading index (BAGEL
        does batch 1, where this is the same as its norm over the whole tensor).
      text_scale, img_scale: scalars (traced or Python). ``text_scale <= 1`` returns ``v_c`` unchanged
        (image CFG is then ignored as well); ``img_scale <= 1`` skips the image branch.
      renorm_type: "global", "channel" or "text_channel" (static).
      renorm_min: lower clamp of the renorm factor (1.0 disables the renorm).
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type {renorm_type!r} is not one of {RENORM_TYPES}")
    eps = 1e-8
    a = v_t + text_scale * (v_c - v_t)
    if renorm_type == "text_channel":
        scale = jnp.clip(_norm(v_c, -1) / (_norm(a, -1) + eps), renorm_min, 1.0)
        a = a * scale
        out = jnp.where(img_scale > 1.0, v_i + img_scale * (a - v_i), a)
    else:
        b = jnp.where(img_scale > 1.0, v_i + img_scale * (a - v_i), a)
        axis = (-2, -1) if renorm_type == "global" else -1
        scale = jnp.clip(_norm(v_c, axis) / (_norm(b, axis) + eps), renorm_min, 1.0)
        out = b * scale
    return jnp.where(text_scale > 1.0, out, v_c)


def euler_step(x, v, dt):
    """One Euler step from noise towards data: ``x - v * dt``."""
    return x - v * dt
