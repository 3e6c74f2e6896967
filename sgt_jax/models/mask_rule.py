"""BAGEL's attention rule on per-token metadata (ByteDance-Seed/Bagel `data/data_utils.py`, docs/interfaces.md
§1): the one definition that the dense, chunked (sgt_jax/models/attention.py) and Pallas
(sgt_jax/models/kernels/flash_bagel.py) attentions evaluate."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

CAUSAL, FULL, NOISE = 0, 1, 2


class TokenMeta(NamedTuple):
    """Per-token attention metadata, each int32 ``[B, T]`` (docs/interfaces.md §1)."""

    doc: jax.Array
    split: jax.Array
    mode: jax.Array
    order: jax.Array

    @classmethod
    def from_batch(cls, batch) -> "TokenMeta":
        return cls(batch["doc"], batch["split"], batch["mode"], batch["order"])

    def slice(self, start: int, stop: int) -> "TokenMeta":
        return TokenMeta(*(a[:, start:stop] for a in self))

    def concat(self, other: "TokenMeta") -> "TokenMeta":
        return TokenMeta(*(jnp.concatenate([a, b], axis=1) for a, b in zip(self, other)))

    def pad(self, n: int) -> "TokenMeta":
        """Append ``n`` pad tokens (doc = split = -1)."""
        if n == 0:
            return self
        b = self.doc.shape[0]
        fill = jnp.full((b, n), -1, self.doc.dtype)
        zero = jnp.zeros((b, n), self.doc.dtype)
        return TokenMeta(*(jnp.concatenate([a, f], axis=1) for a, f in zip(self, (fill, fill, zero, zero))))


def rule(qd, qs, qm, qo, kd, ks, km, ko):
    """The §2.4 rule on broadcastable query fields (doc, split, mode, order) and key fields: the one
    definition that ``allowed`` and the Pallas kernel (sgt_jax/models/kernels) both evaluate."""
    same_split = qs == ks
    visible = (ko <= qo) | (same_split & (qm != CAUSAL))
    hidden_noise = (km == NOISE) & ~same_split
    return (qd >= 0) & (kd >= 0) & (qd == kd) & visible & ~hidden_noise


def allowed(q: TokenMeta, k: TokenMeta) -> jax.Array:
    """Boolean ``[B, Tq, Tk]``: may query i attend to key j (the §2.4 rule)."""
    return rule(*(a[:, :, None] for a in q), *(a[:, None, :] for a in k))
