"""The config files (``--config configs/FILE.py[:VARIANT]``); installed as the package data ``sgt_jax/configs``."""
