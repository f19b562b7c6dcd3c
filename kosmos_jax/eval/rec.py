"""Referring-expression comprehension (REC) on a seqio task's records (`seqio_rec`).

As KOSMOS-2's evaluation (reference/kosmos2.md 2.7): the prompt is the image
then `<grounding><phrase>{expression}</phrase>`; the model's greedy
continuation (`<object><patch_index_a><patch_index_b></object>`) is parsed by
`grounding.post_process_generation`, its first box is the answer, and the
answer is right when its IoU with the reference box is at least 0.5. An output
without a box counts as wrong. The records are any seqio task's whose source
gives (image, expressions, boxes): the shapes tasks', for training-time
evaluation; RefCOCO's files are `eval/refexp.py`'s.
"""

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from kosmos_jax.data import loader
from kosmos_jax.eval import boxes as boxes_lib
from kosmos_jax.eval import common, official_boxes
from kosmos_jax.processing import grounding, views
from kosmos_jax.processing import images as images_lib
from kosmos_jax.processing import processor as processor_lib

IOU_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Example:
  image: np.ndarray  # [H, W, 3] uint8
  expression: str
  box: grounding.Box  # normalized
  key: str = ""


def prompt(expression: str) -> str:
  return f"<grounding><phrase>{expression}</phrase>"


def first_box(text: str, num_patches_per_side: int) -> grounding.Box | None:
  """The first box of the first entity that has one (None: no box)."""
  _, entities = grounding.clean_text_and_extract_entities(text, num_patches_per_side)
  return next((boxes[0] for _, _, boxes in entities if boxes), None)


def processor_for(vocab, model_config: ml_collections.ConfigDict) -> processor_lib.Processor:
  """A processor for a model trained on our pipeline: square pictures at the
  vision tower's size (times the views' grid), the model's slots per
  picture, prompts padded on the left."""
  size = views.input_size(model_config.vision)
  options = images_lib.ImageOptions(size=(size, size), crop_size=(size, size))
  return processor_lib.Processor(
    vocab, options, num_image_tokens=views.image_slots(model_config), padding_side="left"
  )


def task_examples(
  task_name: str, split: str = "validation", num_images: int | None = None
) -> list[Example]:
  """Every (expression, box) of the first `num_images` records of a task whose
  source gives `image` (encoded), `expressions` [n] and `boxes` [n, 4]."""
  examples = []
  for record in loader.source_records(task_name, split, num_images):
    image = images_lib.to_rgb(record["image"])
    for expression, box in zip(record["expressions"], record["boxes"]):
      examples.append(
        Example(image, expression.decode(), tuple(float(v) for v in box), record["key"].decode())
      )
  return examples


def greedy_decode(
  model,
  processor: processor_lib.Processor,
  prompts: Sequence[str],
  images: Sequence,
  *,
  batch_size: int,
  max_new_tokens: int,
) -> list[str]:
  """Greedy generations for (prompt, image) pairs, decoded without special
  tokens, `batch_size` pairs at a time."""
  batch_size = max(1, min(batch_size, len(prompts)))
  texts = []
  for start in range(0, len(prompts), batch_size):
    rows = list(range(start, min(start + batch_size, len(prompts))))
    # A short last batch is filled with copies: every batch has one compiled shape.
    rows += rows[-1:] * (batch_size - len(rows))
    inputs = processor(text=[prompts[i] for i in rows], images=[images[i] for i in rows])
    out = model.generate(
      inputs["input_ids"],
      inputs["pixel_values"],
      inputs["attention_mask"],
      inputs["image_embeds_position_mask"],
      max_new_tokens=max_new_tokens,
      num_beams=1,
      do_sample=False,
    )
    texts += [processor.decode(ids, skip_special_tokens=True) for ids in out]
  return texts[: len(prompts)]


# --- The task interface (eval/common.py) --------------------------------------


def load(
  split: str = "validation",
  num: int | None = None,
  *,
  seqio_task: str,
  max_new_tokens: int = 8,
  strict: bool = False,
) -> common.Dataset:
  """The (expression, box) queries of the first `num` pictures of a seqio task's split."""
  del strict  # the records come from our own pipeline, which checks them
  examples = task_examples(seqio_task, split, num)
  queries = [
    common.Query(f"{e.key}/{i}", e.image, prompt(e.expression)) for i, e in enumerate(examples)
  ]
  side = loader.vocabulary(seqio_task).num_patches_per_side
  return common.Dataset(
    "seqio_rec",
    split,
    queries,
    truth=dict(examples=examples, num_patches_per_side=side),
    decoding=common.Decoding(max_new_tokens=max_new_tokens),
    source=seqio_task,
  )


# H-lines, as the official scorers read them.
prediction = official_boxes.prediction
write_predictions = official_boxes.write_predictions
read_predictions = official_boxes.read_predictions


def sums(dataset: common.Dataset, predictions) -> dict[str, float]:
  side = dataset.truth["num_patches_per_side"]
  out = dict(hits=0.0, iou=0.0, no_box=0.0, count=0.0)
  for i, text in predictions.items():
    box = first_box(text, side)
    iou = 0.0 if box is None else boxes_lib.iou(box, dataset.truth["examples"][i].box)
    out["hits"] += iou >= IOU_THRESHOLD
    out["iou"] += iou
    out["no_box"] += box is None
    out["count"] += 1
  return out


def from_sums(dataset: common.Dataset, totals: dict[str, float]) -> dict[str, float]:
  del dataset
  n = max(totals["count"], 1.0)
  return {
    "rec_accuracy": totals["hits"] / n,
    "rec_mean_iou": totals["iou"] / n,
    "rec_no_box": totals["no_box"] / n,
    "rec_count": totals["count"],
  }


def score(dataset: common.Dataset, predictions) -> dict[str, float]:
  return from_sums(dataset, sums(dataset, predictions)) | common.skip_metrics(dataset, predictions)
