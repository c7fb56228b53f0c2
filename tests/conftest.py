"""Shared test set-up: eight virtual CPU devices, the checkout importable, a tfds data_dir per module.

Eight virtual CPU devices are requested before JAX is imported anywhere, so that sharding tests can build
real meshes on one CPU; tests that do not shard simply run on device 0.
"""

import os
import pathlib
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Config files import experiments.configs.common, as they do under experiments/train.py.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tfds data_dir for a test module's runs (SCAN is built into it once)."""
    return tmp_path_factory.mktemp("tfds")
