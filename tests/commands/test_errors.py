"""A user's mistake through `kosmos-jax` is one line naming it, exit status 2, no traceback."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers

from kosmos_jax import commands
from tests.helpers.hf_reference import random_hf_model

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _error_line(capsys, argv) -> str:
  capsys.readouterr()  # what the test's own setup printed
  with pytest.raises(SystemExit) as e:
    commands.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.mark.parametrize(
  "override, names",
  [
    ("--config.nonexistent=3", "'nonexistent'"),
    ("--config.total_steps=abc", "'total_steps': 'abc' is not an int"),
    ("--config.mesh.foo=1", "mesh has no key 'foo' (keys: data, fsdp, tensor)"),
    ("--config.optim.learning_rate=fast", "'optim.learning_rate': 'fast' is not a float"),
    ("--config.data.shuffle=maybe", "'data.shuffle': 'maybe' is not a boolean"),
  ],
)
def test_a_bad_override_names_its_key(capsys, tmp_path, override, names):
  argv = ["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path), override]
  line = _error_line(capsys, argv)
  assert line.startswith("kosmos-jax train: error: config override") and names in line
  assert not os.listdir(tmp_path)  # nothing started


def test_a_missing_config_file_or_value_is_named(capsys):
  line = _error_line(capsys, ["summary", "--config", "configs/nope.py"])
  assert line == (
    "kosmos-jax summary: error: config file 'configs/nope.py' not found (a configs/NAME.py file)"
  )
  line = _error_line(capsys, ["summary", "--config", "configs/tiny.py", "--config.seed"])
  assert line == "kosmos-jax summary: error: argument --config.seed: expected a value " + (
    "(--config.seed=VALUE)"
  )
  line = _error_line(capsys, ["convert", "orbax-to-hf", "--ckpt", "configs", "--out", "x"])
  assert line.startswith("kosmos-jax convert: error:") and "configs" in line


def test_a_refused_pickle_checkpoint_is_one_line(capsys, tmp_path):
  model = random_hf_model("a", seed=0)
  model.save_pretrained(tmp_path / "hf")
  source = tmp_path / "pickled"
  source.mkdir()
  (source / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  torch.save(
    transformers.Kosmos2ForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict(),
    source / "pytorch_model.bin",
  )
  argv = ["convert", "hf-to-orbax", "--hf-dir", str(source), "--out", str(tmp_path / "out")]
  line = _error_line(capsys, argv)
  assert line.startswith("kosmos-jax convert: error: ") and "pytorch_model.bin" in line
  assert "--allow-pickle" in line


def test_the_shell_sees_one_line_and_no_start_up_noise(tmp_path):
  """As a user runs it: no traceback, and none of TensorFlow's start-up logging
  ('Could not find cuda drivers', cuInit) on a CPU machine."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  base = [sys.executable, "-m", "kosmos_jax.commands"]
  train = [*base, "train", "--config", "configs/tiny.py", "--workdir", str(tmp_path)]
  bad = subprocess.run(
    [*train, "--config.total_steps=abc"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
    "kosmos-jax train: error: config override 'total_steps': 'abc' is not an int "
    "(the config has 20)"
  ]
  good = subprocess.run(
    [*base, "data", "inspect", "shapes32_rec", "--num", "1"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert good.returncode == 0, good.stderr[-2000:]
  assert "shapes32_rec" in good.stdout
  assert "cuda" not in good.stderr.lower() and "Traceback" not in good.stderr
