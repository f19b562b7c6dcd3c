"""Every benchmark script imports and answers `--help`, so none can rot unseen.

The scripts are run by hand (`python -m benchmarks.NAME`); this runs them in
one subprocess (they set the process's malloc options and import torch).
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
  p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common")
)

CHECK = """
import contextlib, importlib, io, sys
for name in sys.argv[1:]:
  module = importlib.import_module(f"benchmarks.{name}")
  sys.argv = [name, "--help"]
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      module.main()
  except SystemExit as e:
    assert e.code == 0, (name, e.code)
  else:
    raise AssertionError(f"{name}: --help did not exit")
  assert "usage:" in out.getvalue(), name
  print("ok", name)
"""


def test_every_benchmark_imports_and_has_help():
  assert {"attention", "data_vs_hf", "forward_vs_hf", "generate_vs_hf", "train_vs_hf"} <= set(
    SCRIPTS
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", CHECK, *SCRIPTS],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert proc.stdout.split() == [w for s in SCRIPTS for w in ("ok", s)]


def test_timed_reports_the_median():
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  calls = []
  median, times = common.timed(lambda: calls.append(1), 5)
  assert len(calls) == len(times) == 5 and min(times) <= median <= max(times)


def test_eval_vs_hf_runs_at_a_tiny_size():
  import json  # pylint: disable=g-import-not-at-top

  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.eval_vs_hf", "--tiny"],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [line["benchmark"] for line in lines] == ["eval_vs_hf/rec", "eval_vs_hf/classification"]
  assert all(line["ours_s"] > 0 and line["hf_s"] > 0 for line in lines)
  assert all(line["matmul_peak_gflops"] > 0 for line in lines)
  assert lines[1]["max_abs_diff"] < 1e-3  # both sides score the same names alike


def test_score_vs_hf_runs_at_a_tiny_size():
  import json  # pylint: disable=g-import-not-at-top

  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.score_vs_hf", "--tiny"],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  (line,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert line["benchmark"] == "score_vs_hf" and line["candidates"] == 40
  assert line["ours_s"] > 0 and line["hf_s"] > 0 and line["matmul_peak_gflops"] > 0
  assert line["max_abs_diff"] < 1e-3  # a forward pass per batch scores the candidates alike
