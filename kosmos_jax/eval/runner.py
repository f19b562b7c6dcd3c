"""Runs a model over a task's queries and scores what it says.

`predict` answers the queries this process owns (every `process_count`-th one),
in batches of prompts with the same length bucket, so each bucket compiles
once and short prompts do not pay for long ones. `evaluate` gathers the
processes' predictions, writes them once in the task's file format and scores
them: tasks that score by sums (hits, counts) add the processes' sums, never
their means.
"""

import collections
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from kosmos_jax import errors, sharding
from kosmos_jax.checkpoints import loading
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.data import loader
from kosmos_jax.eval import common, rec
from kosmos_jax.models import generation
from kosmos_jax.processing import images as images_lib
from kosmos_jax.processing import processor as processor_lib

# Why `predict` skips a query; every process sums all of them (the same keys).
RUNTIME_SKIPS = ("image file missing", "image unreadable")


def processor_for(where: loading.Location, model_config) -> processor_lib.Processor:
  """The checkpoint's own processor files, else (a trainer workdir) the
  vocabulary of the mixture it was trained on, at the model's sizes."""
  if os.path.isfile(os.path.join(where.path, "sentencepiece.bpe.model")):
    return processor_lib.Processor.from_pretrained(where.path)
  if where.kind != "workdir":
    raise errors.UserError(
      f"{where.path}: no sentencepiece.bpe.model beside the weights; a Hugging Face snapshot "
      "has it, and `kosmos-jax convert` copies it"
    )
  data = orbax_ckpt.load_workdir_config(where.path).data
  loader.register_user_tasks(data, model_config)
  return rec.processor_for(loader.vocabulary(data.mixture), model_config)


def _text_and_images(query: common.Query) -> tuple[str, list]:
  """The query's text and images: the prompt after its image, or KOSMOS-1's
  interleaved demonstrations then the prompt."""
  if not query.demonstrations:
    return query.prompt, [query.image]
  return processor_lib.few_shot_prompt(query.demonstrations, query.image, query.prompt)


def _read_image(image) -> tuple[np.ndarray | None, str]:
  """The picture, or None and why it cannot be used."""
  if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
    return None, "image file missing"
  try:
    return images_lib.to_rgb(image), ""
  except ValueError:
    return None, "image unreadable"


def _continuation(processor, ids: np.ndarray) -> str:
  """New tokens as text, markup kept, cut at the first `</s>`."""
  ids = ids.tolist()
  eos = processor.vocab.eos_id
  return processor.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)


def _batches(lengths: dict[int, int], images: dict[int, int], batch_size: int) -> list[list]:
  """Query indices grouped by prompt-length bucket and number of images,
  longest bucket first (the slowest compile and the memory peak show at
  once), `batch_size` a batch."""
  buckets = collections.defaultdict(list)
  for i, n in lengths.items():
    buckets[generation.bucket_length(n), images[i]].append(i)
  return [
    rows[s : s + batch_size]
    for _, rows in sorted(buckets.items(), reverse=True)
    for s in range(0, len(rows), batch_size)
  ]


def predict(
  model,
  processor: processor_lib.Processor,
  task,
  dataset: common.Dataset,
  *,
  batch_size: int = 16,
  indices: Sequence[int] | None = None,
  progress: bool = False,
) -> tuple[dict[int, str], collections.Counter]:
  """The task's predictions (query index -> text) for `indices` (default all),
  and the queries skipped, by reason."""
  indices = range(len(dataset.queries)) if indices is None else indices
  decoding = dataset.decoding
  inputs = {i: _text_and_images(dataset.queries[i]) for i in indices}
  lengths = {
    i: len(processor.vocab.encode(processor.prompt_text(text, len(images))))
    for i, (text, images) in inputs.items()
  }
  batches = _batches(lengths, {i: len(images) for i, (_, images) in inputs.items()}, batch_size)
  predictions, skipped = {}, collections.Counter()
  start, done = time.perf_counter(), 0
  for batch in batches:
    rows, pictures = [], []
    for i in batch:
      read = [_read_image(image) for image in inputs[i][1]]
      reason = next((why for picture, why in read if picture is None), "")
      if reason:
        skipped[reason] += 1
      else:
        rows.append(i)
        pictures.append([picture for picture, _ in read])
    if rows:
      # A short batch is filled with copies: each bucket has one compiled shape.
      rows_filled = rows + rows[-1:] * (batch_size - len(rows))
      pictures += pictures[-1:] * (batch_size - len(rows))
      few_shot = len(pictures[0]) > 1  # one image per text keeps the flat layout
      batch_inputs = processor(
        text=[inputs[i][0] for i in rows_filled],
        images=pictures if few_shot else [p[0] for p in pictures],
        padding_side="left",
      )
      out = model.generate(
        batch_inputs["input_ids"],
        batch_inputs["pixel_values"],
        batch_inputs["attention_mask"],
        batch_inputs["image_embeds_position_mask"],
        max_new_tokens=decoding.max_new_tokens,
        num_beams=decoding.num_beams,
        no_repeat_ngram_size=decoding.no_repeat_ngram_size,
        do_sample=False,
      )
      new = out[:, batch_inputs["input_ids"].shape[1] :]
      for i, ids in zip(rows, new):
        predictions[i] = task.prediction(dataset.queries[i], _continuation(processor, ids))
    done += len(batch)
    if progress:
      _progress(done, len(lengths), time.perf_counter() - start)
  if progress and lengths:
    print(file=sys.stderr)
  return predictions, skipped


def _progress(done: int, total: int, elapsed: float) -> None:
  eta = elapsed / done * (total - done)
  width = 30
  bar = "#" * (width * done // total)
  print(
    f"\r[{bar:<{width}}] {done}/{total} queries, {elapsed:.0f} s, ETA {eta:.0f} s",
    end="",
    file=sys.stderr,
    flush=True,
  )


def local_mesh(batch_size: int):
  """A data-parallel mesh over this host's devices for batches of
  `batch_size` (as many devices as divide it), or None with one device."""
  n = math.gcd(jax.local_device_count(), batch_size)
  if n == 1:
    return None
  return sharding.serving_mesh(data=n, tensor=1, devices=jax.local_devices()[:n])


def process_sum(values: dict[str, float]) -> dict[str, float]:
  """`values` added over the processes (the same keys on each)."""
  if jax.process_count() == 1:
    return dict(values)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  keys = sorted(values)
  summed = multihost_utils.process_allgather(np.array([values[k] for k in keys])).sum(0)
  return dict(zip(keys, summed.tolist()))


def _gather(predictions: dict[int, str], out: str) -> dict[int, str]:
  """Every process's predictions, on process 0 (files in `out`, which all
  processes share, as big_vision's `multiprocess_write_json`)."""
  if jax.process_count() == 1:
    return predictions
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  os.makedirs(out, exist_ok=True)
  part = os.path.join(out, f".predictions.part{jax.process_index()}.json")
  with open(part, "w", encoding="utf-8") as f:
    json.dump(predictions, f)  # int keys come back as strings
  multihost_utils.sync_global_devices("eval predictions written")
  merged = {}
  if jax.process_index() == 0:
    for p in range(jax.process_count()):
      name = os.path.join(out, f".predictions.part{p}.json")
      with open(name, encoding="utf-8") as f:
        merged.update({int(k): v for k, v in json.load(f).items()})
  multihost_utils.sync_global_devices("eval predictions read")
  os.remove(part)
  return merged if jax.process_index() == 0 else predictions


def evaluate(
  model,
  processor: processor_lib.Processor,
  task,
  dataset: common.Dataset,
  *,
  out: str | None = None,
  batch_size: int = 16,
  progress: bool = False,
  mesh=None,
) -> tuple[dict[str, float], dict[int, str]]:
  """Predicts this process's share of the queries, then scores all of them.

  Returns the metrics and the predictions (on process 0; the others get
  their own share, and no metrics for tasks scored on the whole corpus).
  With `out`, process 0 writes the task's predictions file there
  (`predictions.<ext>`) and `metrics.json`. With `mesh` (`local_mesh`, the
  model already on it), each batch is split over its `data` axis.
  """
  mine = range(jax.process_index(), len(dataset.queries), jax.process_count())
  with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    if hasattr(task, "classify"):  # scores candidates instead of generating
      # Both protocols: constrained (top1, top5) and beam-2 generation (top1_open).
      predictions, skipped = task.classify(
        model, processor, dataset, batch_size=batch_size, indices=mine, open_ended=True
      )
    else:
      predictions, skipped = predict(
        model, processor, task, dataset, batch_size=batch_size, indices=mine, progress=progress
      )
  skipped = process_sum(
    {f"skipped/{r}": 0.0 for r in RUNTIME_SKIPS} | {f"skipped/{r}": n for r, n in skipped.items()}
  )
  if hasattr(task, "sums"):
    metrics = task.from_sums(dataset, process_sum(task.sums(dataset, predictions)))
    predictions = _gather(predictions, out) if out else predictions
  else:
    if jax.process_count() > 1 and not out:
      raise ValueError(f"{dataset.task}: a multi-host evaluation needs `out` to gather in")
    predictions = _gather(predictions, out) if out else predictions
    # Corpus metrics (CIDEr's document frequencies) need every prediction: process 0's.
    metrics = task.score(dataset, predictions) if jax.process_index() == 0 else {}
  # The runner's reasons replace score()'s "no prediction" count for the same queries.
  metrics = {k: v for k, v in metrics.items() if not k.startswith("skipped/no prediction")}
  metrics.update({k: v for k, v in skipped.items() if v})
  if out and jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    task.write_predictions(os.path.join(out, task.predictions_file), dataset, predictions)
    with open(os.path.join(out, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics, predictions
