"""Test setup: 8 fake CPU devices so that sharded code paths run for real (set before JAX starts)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
