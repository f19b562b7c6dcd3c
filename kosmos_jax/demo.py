"""`kosmos-jax demo`: train a Kosmos-2 from scratch on the shapes mixture, then measure and show it.

Seven timed phases: startup (from `started`: imports, the config and the
matmul peak's measurement), data (the synthetic pictures are generated on first use,
and the held-out REC examples read), training (`trainer.train`, from scratch:
the run directory is cleared first), REC evaluation on the held-out pictures
(the `rec` evaluator of the config, `eval/rec.py`) and grounded captions,
benchmarks (held-out pictures exported in the real benchmarks' files,
`data/export.py`, and scored by `kosmos-jax eval`'s code), naming (KOSMOS-1's
zero-shot naming by scoring and two-shot naming by an interleaved prompt, on
held-out single-shape pictures, eval/shapes_naming.py) and pictures. Writes
into `out`:
  train/          the training run: checkpoints, config.json, metrics.jsonl
  rec_NN.png      a held-out picture with each expression's predicted box,
                  labelled with its IoU against the reference box
  caption_NN.png  the same picture with the boxes of its grounded caption
                  (captions of more pictures give the caption score,
                  eval/shapes_captions.py)
  benchmarks/     per benchmark: the exported files, predictions and metrics.json
  few_shot.png    the first two-shot prompt's pictures and texts, and the answer
  summary.json    steps, wall times (and normalised to the slowest machine of
                  our kind), loss curve, rec_accuracy and its misses by kind
                  (eval/shapes_misses.py), captions

Machines of our kind differ about 3x in CPU speed, so the demo's budget is
for the slowest: the whole wall time times (this machine's float32 matmul
peak / 140 GFLOP/s) must stay within 15 minutes.
"""

import json
import os
import shutil
import time

import ml_collections

from kosmos_jax.checkpoints import loading
from kosmos_jax.data import export, loader
from kosmos_jax.eval import boxes as boxes_lib
from kosmos_jax.eval import rec, runner, shapes_captions, shapes_misses, shapes_naming
from kosmos_jax.eval import tasks as eval_tasks
from kosmos_jax.processing import visualize
from kosmos_jax.train import mfu, trainer

CAPTION_PROMPT = "<grounding>an image of"  # the shapes captions' opening words
# The slowest machine of our kind (float32 matmul peak) and the demo's budget there.
REFERENCE_PEAK_FLOPS = 140e9
BUDGET_S = 15 * 60
# Each benchmark's headline metric, printed by `describe`.
BENCHMARKS = {
  "refcoco": "accuracy",
  "flickr30k_entities": "R@1",
  "coco_caption": "CIDEr",
  "vqav2": "accuracy",
  "imagenet_zeroshot": "top1",
}


def _curves(metrics_path: str) -> tuple[list, list]:
  """(step, loss) per logged step and the periodic evaluations' rows."""
  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f]
  losses = [[r["step"], round(r["loss"], 4)] for r in rows if "loss" in r]
  evals = [r for r in rows if "loss" not in r]
  return losses, evals


def _captions(model, processor, images: list, max_new_tokens: int, batch_size: int) -> list:
  """Greedy grounded captions: (clean text, entities) per image."""
  decoded = rec.greedy_decode(
    model,
    processor,
    [CAPTION_PROMPT] * len(images),
    images,
    batch_size=batch_size,
    max_new_tokens=max_new_tokens,
  )
  return [processor.post_process_generation(text) for text in decoded]


def _draw(out: str, examples, answers: dict, boxes: list, captions: dict, pictures: int) -> list:
  """rec_NN.png and caption_NN.png for the first `pictures` captioned pictures;
  `answers`: example index -> the REC prediction (prompt and continuation),
  `boxes`: its first box per example (None: none)."""
  by_key = {}
  for i, e in enumerate(examples):
    if i in answers:
      box = boxes[i]
      iou = 0.0 if box is None else boxes_lib.iou(box, e.box)
      by_key.setdefault(e.key, []).append((e, answers[i], box, iou))
  drawn = []
  for i, (key, (text, entities)) in enumerate(list(captions.items())[:pictures]):
    image = by_key[key][0][0].image
    labels = [(f"{e.expression}: IoU {iou:.2f}", (0, 0), [box]) for e, _, box, iou in by_key[key]]
    labels = [label for label in labels if label[2][0] is not None]
    visualize.draw_entities(image, labels).save(os.path.join(out, f"rec_{i:02d}.png"))
    visualize.draw_entities(image, entities).save(os.path.join(out, f"caption_{i:02d}.png"))
    drawn.append(
      dict(
        key=key,
        caption=text,
        entities=[[e[0], [list(b) for b in e[2]]] for e in entities],
        rec=[
          dict(expression=e.expression, output=answer, iou=round(iou, 4))
          for e, answer, _, iou in by_key[key]
        ],
      )
    )
  return drawn


def _benchmarks(model, processor, out: str, num: int, image_size: int, batch_size: int) -> dict:
  """Each benchmark's metrics on `num` held-out pictures exported in its real files."""
  results = {}
  for fmt, task_name in zip(export.FORMATS, BENCHMARKS):
    exported = export.export(fmt, os.path.join(out, fmt, "data"), num, image_size)
    assert exported.task == task_name, (exported.task, task_name)
    task = eval_tasks.get(exported.task)
    args = dict(exported.args)
    if "num_patches_per_side" in task.data_args():
      args["num_patches_per_side"] = processor.vocab.num_patches_per_side
    if "meteor" in task.data_args():
      args["meteor"] = False  # its JVM's start costs ~5 s of the budget; CIDEr is the figure
    dataset = task.load(exported.split, None, **args)
    metrics, _ = runner.evaluate(
      model, processor, task, dataset, out=os.path.join(out, fmt), batch_size=batch_size
    )
    results[exported.task] = metrics
  return results


def _naming(model, processor, out: str, num: int, image_size: int, batch_size: int) -> dict:
  """KOSMOS-1's zero-shot and two-shot naming of `num` held-out single-shape
  pictures; the first two-shot prompt drawn as few_shot.png."""
  pictures = shapes_naming.single_shape_pictures(num, image_size)
  scores = shapes_naming.zero_shot(model, processor, pictures, batch_size=batch_size)
  two_shot, queries = shapes_naming.two_shot(model, processor, pictures, batch_size=batch_size)
  scores.update(two_shot)
  first = queries[0]
  shown = [pictures[d] for d in first["demonstrations"]] + [pictures[0]]
  texts = [caption for _, _, caption in shown[:-1]]
  texts.append(f"{shapes_naming.PROMPT} -> {first['continuation']} (truth: {first['truth']})")
  right = first["answer"] == first["truth"]
  colors = [(0, 0, 0)] * (len(texts) - 1) + [(0, 140, 0) if right else (200, 0, 0)]
  visualize.draw_strip([p for p, _, _ in shown], texts, colors=colors).save(
    os.path.join(out, "few_shot.png")
  )
  return dict(scores, few_shot_example=first)


def run(
  config: ml_collections.ConfigDict,
  out: str,
  *,
  pictures: int = 8,
  caption_images: int = 200,
  benchmark_pictures: int = 100,
  naming_pictures: int = 100,
  caption_tokens: int = 48,
  devices=None,
  started: float | None = None,
) -> dict:
  """Trains, evaluates and draws (see the module doc); returns the summary.

  `started`: `time.perf_counter()` when the process began its work (the
  command line passes its own start, imports included); the wall time and its
  `startup` phase count from there. Default: now.
  """
  start = time.perf_counter() if started is None else started
  peak = mfu.peak_flops()  # before the run: the cores are idle now
  begin = time.perf_counter()
  os.makedirs(out, exist_ok=True)
  workdir = os.path.join(out, "train")
  shutil.rmtree(workdir, ignore_errors=True)
  spec = dict(config.evaluators.rec)
  if spec.pop("task") != "seqio_rec":
    raise ValueError("the demo's `evaluators.rec` must be a seqio_rec evaluator")
  batch_size = spec.pop("batch_size", 64)
  loader.register_user_tasks(config.data, config.model)
  task = eval_tasks.get("seqio_rec")
  dataset = task.load(spec.pop("split", "validation"), spec.pop("num", None), **spec)
  examples = dataset.truth["examples"]
  data_done = time.perf_counter()
  trainer.train(config, workdir, devices)
  train_done = time.perf_counter()
  model = loading.from_pretrained(workdir)
  processor = rec.processor_for(loader.vocabulary(dataset.source), model.config)
  scores, answers = runner.evaluate(
    model, processor, task, dataset, out=os.path.join(out, "rec"), batch_size=batch_size
  )
  side = processor.vocab.num_patches_per_side
  answered = [
    rec.first_box(answers[i], side) if i in answers else None for i in range(len(examples))
  ]
  scores.update(shapes_misses.misses(examples, answered, side))
  # Grounded captions of the first `caption_images` held-out pictures, scored
  # against the shapes each one has.
  objects = shapes_captions.objects_by_picture(examples)
  keys = list(objects)[:caption_images]
  images = {e.key: e.image for e in examples}
  texts = _captions(model, processor, [images[k] for k in keys], caption_tokens, batch_size)
  captions = dict(zip(keys, texts))
  scores.update(shapes_captions.score({k: e for k, (_, e) in captions.items()}, objects))
  eval_done = time.perf_counter()
  size = model.config.vision.image_size
  benchmarks = _benchmarks(
    model, processor, os.path.join(out, "benchmarks"), benchmark_pictures, size, batch_size
  )
  benchmarks_done = time.perf_counter()
  naming = _naming(model, processor, out, naming_pictures, size, batch_size)
  naming_done = time.perf_counter()
  drawn = _draw(out, examples, answers, answered, captions, pictures)
  end = time.perf_counter()
  losses, evals = _curves(os.path.join(workdir, "metrics.jsonl"))
  normalised = (end - start) * peak / REFERENCE_PEAK_FLOPS
  summary = dict(
    mixture=config.data.mixture,
    rec_task=dataset.source,
    rec_split=dataset.split,
    steps=config.total_steps,
    batch_size=config.batch_size,
    seq_len=config.seq_len,
    **scores,
    rec_images=len({e.key for e in examples}),
    wall_time_s=round(end - start, 1),
    matmul_peak_gflops=round(peak / 1e9, 1),
    normalised_wall_time_s=round(normalised, 1),
    budget_s=BUDGET_S,
    within_budget=normalised <= BUDGET_S,
    wall_time_split_s=dict(
      startup=round(begin - start, 1),
      data=round(data_done - begin, 1),
      train=round(train_done - data_done, 1),
      eval=round(eval_done - train_done, 1),
      benchmarks=round(benchmarks_done - eval_done, 1),
      naming=round(naming_done - benchmarks_done, 1),
      pictures=round(end - naming_done, 1),
    ),
    benchmarks=benchmarks,
    naming=naming,
    loss_curve=losses,
    evaluations=evals,
    pictures=drawn,
  )
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def describe(summary: dict, out: str) -> str:
  """A few lines for the terminal."""
  split, naming = summary["wall_time_split_s"], summary["naming"]
  first, last = summary["loss_curve"][0], summary["loss_curve"][-1]
  lines = [
    f"REC accuracy (IoU >= 0.5) {summary['rec_accuracy']:.3f} "
    f"on {summary['rec_count']:.0f} expressions "
    f"of {summary['rec_images']} held-out pictures (mean IoU {summary['rec_mean_iou']:.3f})",
    f"  {summary['shared_colour_accuracy']:.3f} where another shape has the colour "
    f"({summary['shared_colour_count']}); misses: "
    + ", ".join(f"{k} {v}" for k, v in summary["rec_misses"].items()),
    f"grounded captions right {summary['caption_score']:.3f} of {summary['caption_count']} "
    "held-out pictures (real shapes, each once, boxes on them)",
    "benchmark files of held-out pictures: "
    + ", ".join(
      f"{task} {metric} {summary['benchmarks'][task].get(metric, float('nan')):.3f}"
      for task, metric in BENCHMARKS.items()
    ),
    "single-shape pictures named (of 12 colour-kind names): zero-shot "
    f"{naming['zero_shot_top1']:.3f}, two-shot {naming['two_shot_top1']:.3f} "
    f"(in-context prompt drawn in few_shot.png)",
    f"{summary['steps']} steps, loss {first[1]:.3f} (step {first[0]}) -> {last[1]:.3f}",
    f"wall time {summary['wall_time_s']:.0f} s: "
    + ", ".join(f"{k} {v:.0f} s" for k, v in split.items()),
    f"on the slowest machine of our kind: {summary['normalised_wall_time_s']:.0f} s "
    f"(this machine's matmul peak {summary['matmul_peak_gflops']:.0f} GFLOP/s vs "
    f"{REFERENCE_PEAK_FLOPS / 1e9:.0f}); budget {summary['budget_s']} s"
    + ("" if summary["within_budget"] else ": OVER BUDGET"),
  ]
  lines += [f"  {p['key']}: {p['caption']}" for p in summary["pictures"][:3]]
  lines.append(f"pictures and summary.json in {out}")
  return "\n".join(lines)
