"""benchmarks/serve_load.py runs at a tiny size and reports both servers per level."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_serve_load_runs_at_a_tiny_size():
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.serve_load", "--tiny"],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [(line["benchmark"], line["concurrency"]) for line in lines] == [
    ("serve_load", 1),
    ("serve_load", 4),
  ]
  for line in lines:
    for name in ("batched", "unbatched"):
      assert line[f"{name}_rps"] > 0 and 0 < line[f"{name}_p50_ms"] <= line[f"{name}_p99_ms"]
    assert line["unbatched_generate_calls"] == line["requests"]
    assert line["matmul_peak_gflops"] > 0 and line["compiles_after_warmup"] == 0
  assert lines[0]["mean_batch"] == 1
