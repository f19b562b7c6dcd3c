"""Every python and bash example in README.md runs, against a tiny local snapshot.

The examples name `kosmos-2-patch14-224`, the directory a user gets from the hub;
here it is a random-weight transformers model plus a processor trained in the test.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest
import transformers

import kosmos_jax

sys.path.insert(0, os.path.dirname(__file__))
from testutil_spm import make_tiny_processor_dir  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("readme")
  snapshot = str(path / "kosmos-2-patch14-224")
  make_tiny_processor_dir(snapshot)
  vocab_size = kosmos_jax.Processor.from_pretrained(snapshot).vocab.vocab_size
  # A tiny model at the real image size whose vocabulary covers the processor's ids.
  config = transformers.Kosmos2Config(
      text_config=dict(embed_dim=64, layers=2, attention_heads=4, ffn_dim=128,
                       vocab_size=vocab_size),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, image_size=224, patch_size=14),
      latent_query_num=64)
  transformers.Kosmos2ForConditionalGeneration(config).save_pretrained(snapshot)
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
  assert namespace["entities"] == [("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)])]


def test_cli_examples_run(workdir):
  cli = [sys.executable, "-m", "kosmos_jax.cli"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  commands = [line for block in _blocks("bash") for line in block.splitlines()
              if line.startswith("kosmos-jax ")]
  assert len(commands) >= 3
  for line in commands:
    argv = shlex.split(line)[1:]
    argv = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv]
    result = subprocess.run(cli + argv, cwd=workdir, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
