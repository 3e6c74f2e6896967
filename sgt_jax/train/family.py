"""The one switch between model families (``config.model.family``: "bagel" or "omnigen2").

Everything the shared train loop, step, state and compile mode need that differs per family comes from
here: the model builder, the data iterator, and the loss hooks. The code behind each entry lives in the
family's own modules (models/bagel.py + data/pipeline.py + train/losses.py; models/omnigen2.py +
data/omnigen2_pipeline.py + train/omnigen2_sgt.py).

Loss hooks (uniform signatures, so the step's gradient accumulation is family-blind):
  ``noise(key, batch) -> pytree``: every random draw of the step for the WHOLE batch (split with it);
  ``counts(batch) -> (n_ce, n_mse)``: the whole batch's loss normalisers;
  ``loss(model, batch, noise, counts) -> (loss, aux)`` with aux ``ce``, ``mse``, ``n_ce``, ``n_mse``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

FAMILIES = ("bagel", "omnigen2")


def family(config) -> str:
    name = str(config.model.family)
    if name not in FAMILIES:
        raise ValueError(f"config.model.family={name!r}; allowed: {FAMILIES}")
    return name


class LossHooks(NamedTuple):
    noise: Callable
    counts: Callable
    loss: Callable


def loss_hooks(config) -> LossHooks:
    train_cfg, model_cfg = config.train, config.model
    if family(config) == "omnigen2":
        from sgt_jax.train import omnigen2_sgt as og

        return LossHooks(lambda key, batch: og.draw_noise(key, batch, model_cfg), og.token_counts,
                         lambda model, batch, noise, counts: og.sgt_loss(model, batch, noise, counts, train_cfg,
                                                                         model_cfg))
    from sgt_jax.train import losses

    num_images = int(config.data.pack.vae_images)
    return LossHooks(
        lambda key, batch: losses.flow_noise(key, batch, model_cfg=model_cfg, num_images=num_images),
        losses.token_counts,
        lambda model, batch, noise, counts: losses.sgt_loss(model, batch, None, train_cfg, model_cfg, num_images,
                                                            noise=noise, counts=counts))


def model_fn(config, with_vae: bool) -> Callable:
    """``rngs -> nnx.Module`` for the family."""
    if family(config) == "omnigen2":
        from sgt_jax.models.omnigen2 import OmniGen2

        return lambda rngs: OmniGen2(config.model, rngs=rngs, with_vae=with_vae)
    from sgt_jax.models.bagel import Bagel

    return lambda rngs: Bagel(config.model, rngs=rngs, with_vae=with_vae)


def iterator_fn(config) -> Callable:
    """The family's ``make_train_iterator(config, *, process_index, process_count)``."""
    if family(config) == "omnigen2":
        from sgt_jax.data.omnigen2_pipeline import make_train_iterator
    else:
        from sgt_jax.data.pipeline import make_train_iterator
    return make_train_iterator
