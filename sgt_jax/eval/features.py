"""Per-image feature vectors for the linear probe (eval/probe.py).

* ``vit``: the SigLIP NaViT output tokens of the image (post-encoder, BEFORE the connector, as BAGEL's
  t-SNE hook returns them), mean-pooled over the image's patches.
* ``llm<l>``: the LLM's value vectors of the image's ViT tokens at layer ``l`` (``v_proj`` of the
  RMS-normed layer input, all KV heads concatenated), mean-pooled. They are read from the KV cache
  after appending the ViT block, i.e. a linear read-out of the layer-``l`` hidden state of exactly the
  context inference builds; keys are not used because they carry RoPE.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.data.transforms import ImageTransform
from sgt_jax.sampling.engine import StaticGraph, empty_context, round_up


def _vit_pool_fn(static, state, patches, pos, image_id):
    model = nnx.merge(static.graphdef, state)
    return model.vit(patches, pos, image_id).astype(jnp.float32).mean(axis=1)


class FeatureExtractor:
    def __init__(self, inf, vit_transform, llm_layers=()):
        self.inf = inf
        self.transform = ImageTransform(*vit_transform)
        n = inf.model.cfg.llm.num_layers
        self.layers = [int(l) % n for l in llm_layers]
        for l in llm_layers:
            if not -n <= int(l) < n:
                raise ValueError(f"analysis.probe_llm_layers entry {l} outside the model's {n} layers")
        graphdef, state = nnx.split(inf.model)
        self._state = state
        self._vit = functools.partial(_vit_pool_jit, StaticGraph(graphdef, inf.model.cfg))

    def names(self) -> list[str]:
        return ["vit"] + [f"llm{l}" for l in self.layers]

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        vb = self.inf._vit_block(image, self.transform)
        feats = {"vit": np.asarray(self._vit(self._state, jnp.asarray(vb["vit_patches"]), jnp.asarray(vb["vit_pos"]),
                                             jnp.asarray(vb["vit_image"])))[0]}
        if self.layers:
            n = vb["tokens"].shape[1]
            ctx = self.inf.engine.append(empty_context(self.inf.model, round_up(n, 64)), vb, rope_advance=1)
            v = np.asarray(ctx.v[:, 0, 1:n - 1], np.float32)  # [L, n_vit, Hkv, D], markers excluded
            for l in self.layers:
                feats[f"llm{l}"] = v[l].reshape(v.shape[1], -1).mean(axis=0)
        return feats


_vit_pool_jit = jax.jit(_vit_pool_fn, static_argnums=(0,))
