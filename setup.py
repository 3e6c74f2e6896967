"""sgt_jax: Semantic Generative Tuning for unified multimodal models, in JAX."""

from setuptools import find_packages, setup

setup(
    name="sgt_jax",
    version="0.1.0",
    description="JAX/TPU re-implementation of Semantic Generative Tuning (SGT) for BAGEL-7B-MoT",
    python_requires=">=3.11",
    # configs/ (the one copy, used by path in a checkout) ships inside the package as sgt_jax/configs
    packages=find_packages(include=["sgt_jax", "sgt_jax.*"]) + ["sgt_jax.configs"],
    package_dir={"sgt_jax.configs": "configs"},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array_record>=0.8",
        "ml_collections>=1.1.0",
        "absl-py",
        "numpy",
        "ml_dtypes",  # bfloat16 numpy arrays (safetensors I/O)
        "etils[epath]",  # checkpoint paths (sgt_jax/checkpoint/store.py)
        "pillow",
        "safetensors>=0.6",
        "tokenizers>=0.20",
        "tqdm",
        "tensorboardX",
        "msgpack",  # latent-cache records
        "scipy",  # segmentation metric (connected components, Hungarian matching)
    ],
    extras_require={
        # Optional data sources and formats (sgt_jax/extras.py names the extra when one is missing).
        "data": [
            "tensorflow-datasets>=4.9.10",  # kind "tfds", data/shapes_tfds.py
            "importlib_resources",  # tensorflow-datasets imports it but declares it only for Python < 3.9
            "pycocotools",  # SA-1B / COCO RLE masks
            "pyarrow",  # parquet benchmark files (evaluate)
        ],
        "eval": ["scikit-learn", "matplotlib"],  # linear probe, plots
        # The tests exercise every optional path, so they need [data] and [eval] too.
        "test": ["pytest", "nbclient", "nbformat", "ipykernel", "tensorflow-datasets>=4.9.10", "importlib_resources",
                 "pycocotools", "pyarrow", "scikit-learn", "matplotlib"],
        # Parity and verification only; on the dev/CI machines torch must be pinned (see README).
        "torch": ["torch==2.13.0", "transformers>=5.0", "diffusers>=0.42"],
        "tpu": ["jax[tpu]"],
    },
)
