"""The training job: metrics, exact resume, preemption, kill -9, another mesh."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from kosmos_jax import config as config_lib
from kosmos_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12
OVERRIDES = [
  f"total_steps={STEPS}",
  "log_every=1",
  "checkpoint_every=4",
  "batch_size=4",
  "seq_len=64",
  "mesh.fsdp=1",
]


def _config(extra=()):
  return config_lib.load(os.path.join(ROOT, "configs/tiny.py"), [*OVERRIDES, *extra])


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _spawn(workdir, extra=()):
  cmd = [
    sys.executable,
    "-m",
    "kosmos_jax.commands",
    "train",
    "--config",
    "configs/tiny.py",
    "--workdir",
    str(workdir),
    *[f"--config.{o}" for o in [*OVERRIDES, *extra]],
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (
      os.path.exists(os.path.join(workdir, "metrics.jsonl"))
      and max(_losses(workdir), default=0) >= step
    ):
      return
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.2)
  raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run on one device."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = trainer.train(_config(), workdir, devices=jax.devices()[:1])
  return workdir, result


def test_metrics_are_logged(reference):
  workdir, result = reference
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  for key in (
    "loss",
    "accuracy",
    "grad_norm",
    "learning_rate",
    "tokens_per_s",
    "mfu",
    "skipped_steps",
    "dropped/records_dropped",
  ):
    assert key in rows[-1], key
  assert result["step"] == STEPS and 0 < result["mfu"] < 1
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert rows[-1]["loss"] < rows[0]["loss"]


def _send_sigterm_at(workdir, step):
  """A preemption notice from outside, once `step` is logged."""

  def watch():
    deadline = time.time() + 300
    while not (
      os.path.exists(os.path.join(workdir, "metrics.jsonl"))
      and max(_losses(workdir), default=0) >= step
    ):
      if time.time() > deadline:
        return
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


def test_sigterm_saves_at_a_step_boundary_and_resumes_bitwise(reference, tmp_path):
  workdir = str(tmp_path)
  _send_sigterm_at(workdir, 5)
  result = trainer.train(_config(), workdir, devices=jax.devices()[:1])
  preempted = result["preempted_at"]
  assert 5 <= preempted < STEPS and os.path.isdir(tmp_path / "checkpoints" / str(preempted))
  assert max(_losses(workdir)) == preempted
  trainer.train(_config(), workdir, devices=jax.devices()[:1])
  assert _losses(workdir) == _losses(reference[0])  # bitwise: floats compared exactly


def test_cli_survives_kill_9_and_exits_zero_on_sigterm(reference, tmp_path):
  proc = _spawn(tmp_path, ["checkpoint_every=1"])
  _wait_for_step(tmp_path, 4, proc)
  proc.kill()  # SIGKILL, most likely in the middle of an async save
  proc.wait()
  proc = _spawn(tmp_path, ["checkpoint_every=1"])  # resumes from what survived
  _wait_for_step(tmp_path, 7, proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  assert json.loads(out.strip().splitlines()[-1])["preempted_at"] >= 7
  trainer.train(_config(), str(tmp_path), devices=jax.devices()[:1])
  # The child ran with one host device, this process has eight: XLA's CPU
  # kernels may then round differently, so here equal means within float noise.
  np.testing.assert_allclose(_losses(tmp_path)[STEPS], _losses(reference[0])[STEPS], rtol=1e-5)


def test_restores_onto_another_mesh_and_back(reference, tmp_path):
  eight = _config(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  workdir = str(tmp_path)
  _send_sigterm_at(workdir, 4)
  assert trainer.train(eight, workdir)["preempted_at"] < 8
  _send_sigterm_at(workdir, 8)
  assert trainer.train(_config(), workdir, devices=jax.devices()[:1])["preempted_at"] < STEPS
  trainer.train(eight, workdir)
  losses = _losses(workdir)
  ref = _losses(reference[0])
  # Sharded and single-device runs differ only in float summation order.
  np.testing.assert_allclose(
    [losses[s] for s in range(1, STEPS + 1)], [ref[s] for s in range(1, STEPS + 1)], rtol=1e-4
  )


def test_a_vocabulary_mismatch_names_the_keys(tmp_path):
  # Ids past the model's vocabulary would be clamped by the embedding lookup.
  with pytest.raises(
    ValueError, match="model.text.vocab_size is 1000 but mixture 'shapes32_mix' has 1155"
  ):
    trainer.train(_config(["model.text.vocab_size=1000"]), str(tmp_path), devices=jax.devices()[:1])
  # The location init writes the last rows: padding would misplace them.
  with pytest.raises(
    ValueError, match="location_init='sincos2d' needs model.text.vocab_size = the 1155"
  ):
    trainer.train(
      _config(["model.text.location_init=sincos2d"]), str(tmp_path), devices=jax.devices()[:1]
    )
  with pytest.raises(
    ValueError, match="num_patches_per_side is 16 but mixture 'shapes32_mix' has a 32 x 32"
  ):
    trainer.train(
      _config(
        [
          "model.text.location_init=sincos2d",
          "model.text.vocab_size=1155",
          "model.text.num_patches_per_side=16",
        ]
      ),
      str(tmp_path),
      devices=jax.devices()[:1],
    )
