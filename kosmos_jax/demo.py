"""`kosmos-jax demo`: train a Kosmos-2 from scratch on the shapes mixture, then measure and show it.

Five timed phases: startup (from `started`: imports, the config and the
matmul peak's measurement), data (the synthetic pictures are generated on first use,
and the held-out REC examples read), training (`trainer.train`, from scratch:
the run directory is cleared first), REC evaluation on the held-out pictures
(`eval/rec.py`), and pictures (grounded captions of a few of them). Writes into
`out`:
  train/          the training run: checkpoints, config.json, metrics.jsonl
  rec_NN.png      a held-out picture with each expression's predicted box,
                  labelled with its IoU against the reference box
  caption_NN.png  the same picture with the boxes of its grounded caption
                  (captions of more pictures give the caption score,
                  eval/shapes_captions.py)
  summary.json    steps, wall times (and normalised to the slowest machine of
                  our kind), loss curve, rec_accuracy, captions

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
from kosmos_jax.data import loader
from kosmos_jax.eval import rec, shapes_captions
from kosmos_jax.processing import visualize
from kosmos_jax.train import mfu, trainer

CAPTION_PROMPT = "<grounding>an image of"  # the shapes captions' opening words
# The slowest machine of our kind (float32 matmul peak) and the demo's budget there.
REFERENCE_PEAK_FLOPS = 140e9
BUDGET_S = 15 * 60


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


def _draw(out: str, predictions: list[rec.Prediction], captions: dict, pictures: int) -> list:
  """rec_NN.png and caption_NN.png for the first `pictures` captioned pictures."""
  by_key = {}
  for p in predictions:
    by_key.setdefault(p.example.key, []).append(p)
  drawn = []
  for i, (key, (text, entities)) in enumerate(list(captions.items())[:pictures]):
    image = by_key[key][0].example.image
    answers = [
      (f"{p.example.expression}: IoU {p.iou:.2f}", (0, 0), [p.box])
      for p in by_key[key]
      if p.box is not None
    ]
    visualize.draw_entities(image, answers).save(os.path.join(out, f"rec_{i:02d}.png"))
    visualize.draw_entities(image, entities).save(os.path.join(out, f"caption_{i:02d}.png"))
    drawn.append(
      dict(
        key=key,
        caption=text,
        entities=[[e[0], [list(b) for b in e[2]]] for e in entities],
        rec=[
          dict(expression=p.example.expression, output=p.text, iou=round(p.iou, 4))
          for p in by_key[key]
        ],
      )
    )
  return drawn


def run(
  config: ml_collections.ConfigDict,
  out: str,
  *,
  pictures: int = 8,
  caption_images: int = 200,
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
  cfg = config.rec
  loader.register_user_tasks(config.data)
  examples = rec.task_examples(cfg.task, cfg.split, cfg.num_images)
  data_done = time.perf_counter()
  trainer.train(config, workdir, devices)
  train_done = time.perf_counter()
  model = loading.from_pretrained(workdir)
  processor = rec.processor_for(loader.vocabulary(cfg.task), model.config)
  predictions = rec.predict(
    model, processor, examples, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
  )
  scores = rec.metrics(predictions)
  # Grounded captions of the first `caption_images` held-out pictures, scored
  # against the shapes each one has.
  objects = shapes_captions.objects_by_picture(examples)
  keys = list(objects)[:caption_images]
  images = {e.key: e.image for e in examples}
  texts = _captions(model, processor, [images[k] for k in keys], caption_tokens, cfg.batch_size)
  captions = dict(zip(keys, texts))
  scores.update(shapes_captions.score({k: e for k, (_, e) in captions.items()}, objects))
  eval_done = time.perf_counter()
  drawn = _draw(out, predictions, captions, pictures)
  end = time.perf_counter()
  losses, evals = _curves(os.path.join(workdir, "metrics.jsonl"))
  normalised = (end - start) * peak / REFERENCE_PEAK_FLOPS
  summary = dict(
    mixture=config.data.mixture,
    rec_task=cfg.task,
    rec_split=cfg.split,
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
      pictures=round(end - eval_done, 1),
    ),
    loss_curve=losses,
    evaluations=evals,
    pictures=drawn,
  )
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def describe(summary: dict, out: str) -> str:
  """A few lines for the terminal."""
  split = summary["wall_time_split_s"]
  first, last = summary["loss_curve"][0], summary["loss_curve"][-1]
  lines = [
    f"REC accuracy (IoU >= 0.5) {summary['rec_accuracy']:.3f} "
    f"on {summary['rec_count']} expressions "
    f"of {summary['rec_images']} held-out pictures (mean IoU {summary['rec_mean_iou']:.3f})",
    f"grounded captions right {summary['caption_score']:.3f} of {summary['caption_count']} "
    "held-out pictures (real shapes, each once, boxes on them)",
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
