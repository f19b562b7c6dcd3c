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


# The GPU machine has neither TensorFlow nor seqio: the way it lacks them
# (find_spec None, import fails), so libraries that probe for them behave as there.
_HIDE_TF = """
import importlib.machinery
import sys


class _Hidden(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.partition(".")[0] in ("tensorflow", "seqio"):
      return None
    return super().find_spec(name, path, target)


sys.meta_path[:] = [_Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


# One row per code path of benchmarks/gpu_vs_hf.py (--tiny's flash length is 128).
_GPU_VS_HF_ROWS = (
  "train/ours/pallas/none",
  "train/ours/cudnn/full",
  "train/transformers",
  "generate/ours/ngram3",
  "generate/transformers/ngram3",
  "flash/ours/128",
  "flash/cudnn/128",
  "decode/xla",
)


def test_gpu_vs_hf_runs_one_row_per_code_path_at_a_tiny_size_without_tensorflow(tmp_path):
  import json  # pylint: disable=g-import-not-at-top

  (tmp_path / "sitecustomize.py").write_text(_HIDE_TF)  # in the parent and every row's child
  path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
  proc = subprocess.run(
    # Two rows at a time: most of a tiny row is compiling, on one core.
    [sys.executable, "-m", "benchmarks.gpu_vs_hf", "--tiny", "--jobs", "2"]
    + ["--only", *_GPU_VS_HF_ROWS],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  *lines, summary = [json.loads(line) for line in proc.stdout.splitlines()]
  by_row = {line["row"]: line for line in lines}
  assert len(lines) == len(by_row) == summary["rows"] and set(by_row) == set(_GPU_VS_HF_ROWS)
  gpu_only = {"train/ours/cudnn/full", "flash/cudnn/128"}
  assert set(summary["failed"]) == gpu_only, proc.stderr[-3000:]
  for name, line in by_row.items():
    assert line["benchmark"] == "gpu_vs_hf" and line["platform"] == "cpu" and line["device"]
    assert ("torch" if "transformers" in name else "jax") in line  # its side's versions
    if name in gpu_only:  # our code traced, then stopped before the device call
      assert line["error"] == "needs a GPU"
      continue
    assert line["median_s"] > 0 and line["peak_memory_bytes"] is None  # no device memory on CPU
    if name.startswith("train/"):
      assert line["tokens_per_s"] > 0 and line["model_flops_per_step"] > 0
      assert "mfu" in line and line["first_call_s"] > 0
    elif name.startswith("generate/"):
      assert line["tokens_per_s"] > 0 and line["first_call_s"] > 0
    elif name.startswith("flash/"):
      assert line["tflops"] > 0 and line["tokens_per_s"] > 0
    else:
      assert line["useful_gb_per_s"] > 0 and line["hbm_fraction"] is None
  assert by_row["flash/ours/128"]["max_abs_diff_vs_xla"] < 0.05  # bf16 outputs, same inputs
