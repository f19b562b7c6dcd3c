"""Test-wide setup: CPU only, 8 host devices so sharding tests can build a mesh."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
# Ahead-of-time TPU compiles load libtpu; let several test processes do so at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
