"""Shared test set-up.

Eight virtual CPU devices are requested before JAX is imported anywhere, so that sharding tests can build
real meshes on one CPU; tests that do not shard simply run on device 0.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
