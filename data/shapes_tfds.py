"""TFDS builder for the synthetic shapes world (sgt_jax/data/synthetic.py), in ArrayRecord format, no TensorFlow.

Build once, read with ``tfds.data_source`` (random access, Grain-compatible)::

    from data.shapes_tfds import build, SgtShapes
    build(data_dir="/tmp/tfds", config="default")     # or SgtShapes(data_dir=..., config=...).download_and_prepare()
    ds = tfds.data_source("sgt_shapes/default", data_dir="/tmp/tfds", split="train")
    ds[0]  # {"key", "image" uint8 [H,W,3], "target" uint8 [H,W,3], "caption", "question", "answer"}

Images are handed to ``tfds.features.Image`` as PNG bytes (numpy input would need TensorFlow to encode).
Configs: default (512 train samples), tiny (32), large (20000); world seed 0, other settings as
``synthetic.WorldConfig``. Splits: train = indices [0, num_samples), validation = the next ``num_samples // 8``.
Each example carries its first VQA pair; the full conversation is ``synthetic.conversation(...)`` of the index.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from sgt_jax.data import synthetic
from sgt_jax.data.sources.common import encode_png


class ShapesConfig(tfds.core.BuilderConfig):
    """A named world: the number of train samples and the world seed (other settings: WorldConfig defaults)."""

    def __init__(self, *, num_samples: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.world = synthetic.WorldConfig(seed=seed, num_samples=num_samples)


class SgtShapes(tfds.core.GeneratorBasedBuilder):
    """The SGT synthetic shapes world: image, instance colour map target, caption and one QA pair."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="512 train samples, seed 0", num_samples=512),
        ShapesConfig(name="tiny", description="32 train samples, seed 0 (tests)", num_samples=32),
        ShapesConfig(name="large", description="20000 train samples, seed 0", num_samples=20_000),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *, file_format="array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "key": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "target": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
            }),
            supervised_keys=("image", "target"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        n = self.builder_config.world.num_samples
        return {"train": self._generate_examples(0, n), "validation": self._generate_examples(n, n + max(1, n // 8))}

    def _generate_examples(self, start: int, stop: int):
        world = self.builder_config.world
        for index in range(start, stop):
            scene = synthetic.make_scene(world, index)
            image, target, _ = synthetic.render_scene(scene)
            turns = synthetic.conversation(scene, world, index)
            yield scene.key, {
                "key": scene.key,
                "index": index,
                "image": encode_png(image),
                "target": encode_png(target),
                "caption": synthetic.caption(scene),
                "question": turns[0]["value"].replace("<image>\n", ""),
                "answer": turns[1]["value"],
            }


def build(data_dir: str, config: str = "default") -> SgtShapes:
    """Generates the dataset ``sgt_shapes/<config>`` under ``data_dir`` (ArrayRecord) and returns the builder."""
    builder = SgtShapes(data_dir=data_dir, config=config)
    builder.download_and_prepare()
    return builder
