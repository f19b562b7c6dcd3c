"""`kosmos-jax demo` end to end on the tiny config: train, score, draw, summarise."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_writes_summary_and_pictures(tmp_path):
  out = tmp_path / "demo_out"
  overrides = [
    "total_steps=4",
    "log_every=1",
    "batch_size=4",
    "seq_len=64",
    "images_per_row=2",
    "evaluators.rec.num=3",
    "evaluators.rec.batch_size=4",
    "eval_every=4",
    "data.eval_batches=1",
  ]
  cmd = [
    sys.executable,
    "-m",
    "kosmos_jax.commands",
    "demo",
    "--config",
    "configs/tiny.py",
    "--out",
    str(out),
    "--pictures",
    "2",
    "--benchmark-pictures",
    "4",
    "--naming-pictures",
    "5",
    *[f"--config.{o}" for o in overrides],
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "REC accuracy" in proc.stdout and str(out) in proc.stdout

  summary = json.loads((out / "summary.json").read_text())
  assert summary["steps"] == 4 and [s for s, _ in summary["loss_curve"]] == [1, 2, 3, 4]
  assert 0.0 <= summary["rec_accuracy"] <= 1.0
  # Every miss has one kind: hits plus misses are all the expressions.
  misses = sum(summary["rec_misses"].values())
  assert round(summary["rec_accuracy"] * summary["rec_count"]) + misses == summary["rec_count"]
  assert 0 <= summary["shared_colour_count"] <= summary["rec_count"]
  assert 0.0 <= summary["caption_score"] <= 1.0 and summary["caption_count"] == 3
  assert "grounded captions right" in proc.stdout
  assert summary["rec_images"] == 3 and summary["rec_count"] >= 3
  assert set(summary["wall_time_split_s"]) == {
    "startup",
    "data",
    "train",
    "eval",
    "benchmarks",
    "naming",
    "pictures",
  }
  # Every benchmark read back from its exported files and scored.
  assert set(summary["benchmarks"]) == {
    "refcoco",
    "flickr30k_entities",
    "coco_caption",
    "vqav2",
    "imagenet_zeroshot",
  }
  assert summary["benchmarks"]["refcoco"]["count"] > 0
  assert 0.0 <= summary["benchmarks"]["flickr30k_entities"]["R@1"] <= 1.0
  assert "benchmark files of held-out pictures" in proc.stdout
  # KOSMOS-1's naming: zero-shot by scoring, two-shot by an interleaved prompt.
  naming = summary["naming"]
  assert naming["zero_shot_count"] == naming["two_shot_count"] == 5
  assert 0.0 <= naming["zero_shot_top1"] <= naming["zero_shot_kind"] <= 1.0
  assert naming["few_shot_example"]["prompt"].count("<image>") == 3
  assert (out / "few_shot.png").stat().st_size > 0
  assert "zero-shot" in proc.stdout
  assert (out / "benchmarks" / "refcoco" / "predictions.txt").exists()
  # The clock starts with the command: imports count.
  assert summary["wall_time_split_s"]["startup"] > 0.5
  # The wall time normalised to the slowest machine of our kind (140 GFLOP/s).
  assert summary["matmul_peak_gflops"] > 10 and summary["budget_s"] == 900
  normalised = summary["wall_time_s"] * summary["matmul_peak_gflops"] / 140
  assert abs(summary["normalised_wall_time_s"] - normalised) <= 0.01 * normalised + 0.2
  assert summary["within_budget"] == (summary["normalised_wall_time_s"] <= 900)
  assert "on the slowest machine of our kind" in proc.stdout
  # The trainer's periodic hook scored REC too.
  assert "eval/rec/rec_accuracy" in summary["evaluations"][-1]
  assert len(summary["pictures"]) == 2
  for i in range(2):
    assert (out / f"rec_{i:02d}.png").stat().st_size > 0
    assert (out / f"caption_{i:02d}.png").stat().st_size > 0
