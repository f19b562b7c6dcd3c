"""Every python and bash example in README.md runs, against a tiny local snapshot.

The examples name `kosmos-2-patch14-224`, the directory a user gets from the hub;
here it is a random-weight transformers model plus a processor trained in the test.
"""

import json
import os
import re
import shlex

import pytest

from kosmos_jax import commands
from tests.helpers.spm import make_tiny_snapshot, write_snowman

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("readme")
  make_tiny_snapshot(path / "kosmos-2-patch14-224")
  write_snowman(path / "snowman.jpg")
  # The fine-tuning examples' conversation file (README "Fine-tune on your data").
  turns = [
    {"from": "human", "value": "<image> What is in the picture?"},
    {"from": "gpt", "value": "<phrase>A snowman</phrase><box> in the snow."},
  ]
  line = {"image": "snowman.jpg", "conversations": turns, "boxes": [[120, 10, 310, 200]]}
  line["box_units"] = "pixels"
  (path / "chat.jsonl").write_text("\n".join([json.dumps(line)] * 4) + "\n")
  return path


def test_python_examples_run(workdir, monkeypatch):
  monkeypatch.chdir(workdir)
  blocks = _blocks("python")
  assert blocks
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["out"].logits.shape[0] == 1
  assert namespace["text"] == "An image of a snowman."
  assert namespace["entities"] == [
    ("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)])
  ]


def test_cli_examples_run(workdir, monkeypatch):
  # In-process: one interpreter's imports and compile caches serve every command.
  monkeypatch.chdir(workdir)
  lines = [
    line
    for block in _blocks("bash")
    for line in block.splitlines()
    if line.startswith("kosmos-jax ")
  ]
  assert len(lines) >= 5
  for line in lines:
    argv = shlex.split(line)[1:]
    argv = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv]
    try:
      commands.main(argv)
    except SystemExit as e:
      raise AssertionError(f"{line}: exit {e.code}") from e
