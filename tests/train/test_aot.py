"""`kosmos-jax aot` compiles the real train step for a TPU topology on this CPU host."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from kosmos_jax import commands
from kosmos_jax import config as config_lib
from kosmos_jax.data import loader
from kosmos_jax.train import aot, optim
from kosmos_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_tiny_train_step_compiles_for_v5e(capsys, attention):
  commands.main(
    [
      "aot",
      "--config",
      "configs/tiny.py",
      "--topology",
      "v5e:2x2",
      "--config.mesh.data=2",
      "--config.mesh.fsdp=2",
      "--config.batch_size=8",
      "--config.seq_len=64",
      f"--config.attention={attention}",
      "--config.model.text.attention_dropout=0.0",
    ]
  )
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report["fits"] and 0 < report["total_gib"] < report["hbm_gib"]
  assert report["argument_gib"] > 0 and report["tokens_per_step"] == 8 * 64


def test_one_chip_plans_compile():
  # A process with one CPU device and one TPU chip takes jax.make_mesh's path
  # (whose default Explicit axes failed the activations' sharding
  # constraints); a LoRA fine-tune on one chip is planned this way.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "-m", "kosmos_jax.commands", "aot", "--config", "configs/tiny.py"]
  cmd += ["--topology", "v5e:1x1", "--config.mesh.fsdp=1", "--config.batch_size=2"]
  cmd += ["--config.seq_len=64", "--config.lora.rank=4"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["devices"] == 1 and report["fits"]


def test_a_plan_that_does_not_fit_fails_loudly(capsys):
  with pytest.raises(SystemExit, match="GiB per chip"):
    commands.main(
      [
        "aot",
        "--config",
        "configs/tiny.py",
        "--topology",
        "v5e:2x2",
        "--config.mesh.data=4",
        "--config.batch_size=16384",
        "--config.seq_len=256",
        "--config.images_per_row=0",
      ]
    )


def test_the_plan_is_for_the_batches_and_state_the_trainer_has():
  """aot compiles for the loader's batch layout (models/batch.py) and the
  trainer's state (train/state.py): same names, shapes and dtypes."""
  config = config_lib.load("configs/tiny.py", ["batch_size=2", "seq_len=64"])
  ds = loader.dataset(
    config.data.mixture,
    "train",
    seq_len=config.seq_len,
    images_per_row=config.images_per_row,
    batch_size=config.batch_size,
    seed=0,
  )
  real = next(loader.numpy_batches(iter(ds)))
  planned = aot.abstract_batch(config)
  assert {k: (v.shape, v.dtype) for k, v in real.items()} == {
    k: (s.shape, s.dtype) for k, s in planned.items()
  }
  tx = optim.optimizer(config.optim, config.total_steps)
  _, state = state_lib.abstract(config.model, tx, config.seed)
  # A raw uint32 key, which Orbax checkpoints as a plain array.
  assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)
  assert state.opt_state is not None and jax.tree.leaves(state.params)
