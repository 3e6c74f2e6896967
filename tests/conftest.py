"""Suite-wide pytest setup.

Fake CPU devices: tests marked ``multidevice`` need 8 CPU devices. They are created only when at least
one such test is selected, and before any JAX backend is initialised (collection imports jax but does
not touch a backend). Other tests then run on the same 8-device CPU platform but use device 0 only.
"""

import os

import pytest

NUM_FAKE_DEVICES = 8


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("multidevice") for item in items):
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", NUM_FAKE_DEVICES)
        except RuntimeError as err:  # backend already initialised by an import-time computation
            raise pytest.UsageError(
                f"multidevice tests selected but the JAX backend was initialised during collection: {err}"
            )


def pytest_runtest_setup(item):
    if item.get_closest_marker("multidevice"):
        import jax

        if jax.device_count() < NUM_FAKE_DEVICES:
            pytest.fail(f"needs {NUM_FAKE_DEVICES} devices, have {jax.device_count()}")


@pytest.fixture
def tiny_config():
    """The tiny model/data/train config used across the suite (configs/sgt_tiny.py)."""
    from sgt_jax.configs_util import load_config

    return load_config("configs/sgt_tiny.py")


def pytest_report_header(config):
    return (f"SGT_REQUIRE_TORCH={os.environ.get('SGT_REQUIRE_TORCH', '0')} "
            f"SGT_REQUIRE_LIBTPU={os.environ.get('SGT_REQUIRE_LIBTPU', '0')}")
