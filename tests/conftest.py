"""Test-wide setup: CPU only, 8 host devices so sharding tests can build a mesh."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
# Ahead-of-time TPU compiles load libtpu; let several test processes do so at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory):
  """A directory with a tiny random Hugging Face snapshot `snap` and pictures
  `snowman.jpg` (320 x 240) and `tall.png` (40 x 90)."""
  from tests.helpers import spm  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("tiny_snapshot")
  spm.make_tiny_snapshot(path / "snap")
  spm.write_snowman(path / "snowman.jpg")
  spm.write_snowman(path / "tall.png", (40, 90))
  return path
