import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import testutil_spm  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory):
  """A directory with a tiny random Hugging Face snapshot `snap` and pictures
  `snowman.jpg` (320 x 240) and `tall.png` (40 x 90)."""
  path = tmp_path_factory.mktemp("tiny_snapshot")
  testutil_spm.make_tiny_snapshot(path / "snap")
  testutil_spm.write_snowman(path / "snowman.jpg")
  testutil_spm.write_snowman(path / "tall.png", (40, 90))
  return path
