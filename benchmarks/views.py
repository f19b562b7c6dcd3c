"""SPHINX's sub-image views on small objects: REC of a single-view model vs 2 x 2 views.

The shapes world at twice the tower's side (`--tile` x 2 px) with small shapes
(`--object-scale`, sides as fractions of the picture), a REC-heavy mixture
and the `make demo` model (configs/shapes.py) with a 32 x 32 location grid:
  single  the picture resized to one `--tile` px view (the released design);
  views   `model.vision.views = {"grid": 2, "global": True}`: the picture at
          2 x tile, a global view and four tiles, 5 x (16 + 2) slots.
SPHINX-1k is tuned from SPHINX, not trained from scratch, and so is this: a
single-view base model trains `--init-steps`, then each branch trains
`--steps` more from it, the same steps, batch and pictures per row (the same
training examples); the views branch adds its tags (from_pretrained with
views). `--init-steps 0` trains both from scratch instead. REC accuracy (IoU
>= 0.5, greedy) on the same held-out pictures; one JSON line per run with
its train and eval seconds and this machine's matmul peak, then a line with
both side by side. Run: `.venv/bin/python -m benchmarks.views [--steps N]`;
`--tile 224 --patch 14` is SPHINX-1k's 448 px setting (an accelerator's job).
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from kosmos_jax import heap  # noqa: I001  (before jax: the process keeps freed memory)

heap.keep_freed_memory()

from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import loading
from kosmos_jax.data import loader, shapes
from kosmos_jax.eval import rec, runner
from kosmos_jax.eval import tasks as eval_tasks
from kosmos_jax.processing import views
from kosmos_jax.train import mfu, trainer

LATENTS, GRID = 16, 32  # the demo's latents; location cells of picture / 32
SPHINX_1K = {"grid": 2, "global": True}


def make_config(args, name: str, steps: int, init_from: str = ""):
  """configs/shapes.py for a run ("base", "single", "views"), its tasks named."""
  multi = name == "views"
  vocab_size = shapes.shapes_vocabulary(GRID).vocab_size
  config = config_lib.load(
    "configs/shapes.py",
    [
      f"model.vision.image_size={args.tile}",
      f"model.vision.patch_size={args.patch}",
      f"model.latent_query_num={LATENTS}",
      f"model.text.num_patches_per_side={GRID}",
      f"model.text.vocab_size={vocab_size}",
      "model.text.max_positions=512",
      f"total_steps={steps}",
      f"checkpoint_every={steps}",
      f"seed={args.seed}",
      f"batch_size={args.batch_size}",
      "images_per_row=2",
      # One REC sequence per picture is ~40 tokens beside its slots.
      f"seq_len={128 if not multi else 2 * (5 * (LATENTS + 2) + 48)}",
      "evaluators={}",
    ],
  )
  if multi:
    config.model.vision.views = dict(SPHINX_1K)
  picture = 2 * args.tile
  config.data.shapes_tasks = dict(
    prefix=f"views_{name}",
    image_size=views.input_size(config.model.vision),
    num_image_tokens=views.image_slots(config.model),
    num_patches_per_side=GRID,
    config=dict(
      # TFDS caches a config by name: every field that changes it is in it.
      name=f"{picture}_small_{args.object_scale[0]:g}_{args.object_scale[1]:g}"
      f"_{args.num_train}_{args.num_eval}",
      image_size=picture,
      num_train=args.num_train,
      num_test=args.num_eval,
      object_scale=tuple(args.object_scale),
    ),
    rates=dict(rec=10, grit=3),
    use_box_prob=1.0,
    rec_per_image=True,
  )
  config.data.mixture = f"views_{name}_mix"
  config.init_from = init_from  # the model's shape comes from it, views added
  return config


def run(args, name: str, workdir: str, steps: int, init_from: str = "") -> dict:
  config = make_config(args, name, steps, init_from)
  loader.register_user_tasks(config.data, config.model)
  task = eval_tasks.get("seqio_rec")
  dataset = task.load("validation", args.num_eval, seqio_task=f"views_{name}_rec")
  started = time.perf_counter()
  trainer.train(config, workdir)
  trained = time.perf_counter()
  model = loading.from_pretrained(workdir)
  processor = rec.processor_for(loader.vocabulary(dataset.source), model.config)
  scores, _ = runner.evaluate(model, processor, task, dataset, batch_size=32)
  return dict(
    model=name,
    views=views.count(config.model.vision),
    pixels=views.input_size(config.model.vision),
    slots_per_picture=views.image_slots(config.model),
    init_steps=args.init_steps if init_from else 0,
    steps=steps,
    batch_size=args.batch_size,
    rec_accuracy=round(scores["rec_accuracy"], 4),
    rec_mean_iou=round(scores["rec_mean_iou"], 4),
    rec_count=int(scores["rec_count"]),
    train_s=round(trained - started, 1),
    eval_s=round(time.perf_counter() - trained, 1),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--init-steps", type=int, default=3000, help="the single-view base")
  parser.add_argument("--steps", type=int, default=1000, help="each branch's steps")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--tile", type=int, default=64, help="the towers' side in px")
  parser.add_argument("--patch", type=int, default=8)
  parser.add_argument("--object-scale", type=float, nargs=2, default=[0.1, 0.2])
  parser.add_argument("--num-train", type=int, default=20000)
  parser.add_argument("--num-eval", type=int, default=300, help="held-out pictures")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  parser.add_argument("--models", nargs="+", default=["single", "views"])
  args = parser.parse_args()
  peak = round(mfu.peak_flops() / 1e9, 1)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    root, base = args.workdir or tmp, ""
    if args.init_steps:
      base = os.path.join(root, "base")
      print(json.dumps(dict(run(args, "base", base, args.init_steps), matmul_peak_gflops=peak)))
    for name in args.models:
      workdir = os.path.join(root, name)
      results[name] = dict(run(args, name, workdir, args.steps, base), matmul_peak_gflops=peak)
      print(json.dumps(results[name]), flush=True)
  print(
    json.dumps(
      dict(
        rec_accuracy={k: v["rec_accuracy"] for k, v in results.items()},
        train_s={k: v["train_s"] for k, v in results.items()},
        init_steps=args.init_steps,
        steps=args.steps,
        object_scale=args.object_scale,
        picture_px=2 * args.tile,
        matmul_peak_gflops=peak,
      )
    )
  )


if __name__ == "__main__":
  main()
