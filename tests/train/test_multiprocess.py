"""Two `jax.distributed` processes on localhost (CPU collectives) train, checkpoint, resume."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, total_steps):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "kosmos_jax.commands",
        "train",
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(workdir),
        "--coordinator",
        f"localhost:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
        f"--config.total_steps={total_steps}",
        "--config.log_every=2",
        "--config.checkpoint_every=2",
        "--config.batch_size=4",
        "--config.seq_len=64",
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=400)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  _run_two_processes(tmp_path, 4)
  data = os.listdir(tmp_path / "checkpoints" / "4" / "data")
  assert any(f.startswith("process_0") for f in data) and any(
    f.startswith("process_1") for f in data
  )
  outs = _run_two_processes(tmp_path, 6)
  result = json.loads(outs[0].strip().splitlines()[-1])
  assert result["step"] == 6
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [2, 4, 6]  # only process 0 writes; the second run resumed at 4
