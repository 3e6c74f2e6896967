"""sgt_jax: Semantic Generative Tuning for unified multimodal models, in JAX."""

from setuptools import find_packages, setup

setup(
    name="sgt_jax",
    version="0.1.0",
    description="JAX/TPU re-implementation of Semantic Generative Tuning (SGT) for BAGEL-7B-MoT",
    python_requires=">=3.11",
    packages=find_packages(include=["sgt_jax", "sgt_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array_record>=0.8",
        "tensorflow-datasets>=4.9.10",
        "ml_collections>=1.1.0",
        "absl-py",
        "numpy",
        "pillow",
        "safetensors>=0.6",
        "tokenizers>=0.20",
        "pycocotools",
        "tqdm",
        "tensorboardX",
        "scikit-learn",
        "matplotlib",
        "pyarrow",
        "importlib_resources",  # tfds download_and_prepare needs it
        "msgpack",
        "scipy",
    ],
    extras_require={
        "test": ["pytest", "nbclient", "nbformat", "ipykernel"],
        # Parity and verification only; on the dev/CI machines torch must be pinned (see README).
        "torch": ["torch==2.13.0", "transformers>=5.0", "diffusers>=0.42"],
        "tpu": ["jax[tpu]"],
    },
)
