"""Referring-expression comprehension (REC): which box does an expression name?

As KOSMOS-2's evaluation (reference/kosmos2.md 2.7): the prompt is the image
then `<grounding><phrase>{expression}</phrase>`; the model's greedy
continuation (`<object><patch_index_a><patch_index_b></object>`) is parsed by
`grounding.post_process_generation`, its first box is the answer, and the
answer is right when its IoU with the reference box is at least 0.5. An output
without a box counts as wrong.
"""

import dataclasses
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

from kosmos_jax.data import loader
from kosmos_jax.eval import boxes as boxes_lib
from kosmos_jax.processing import grounding
from kosmos_jax.processing import images as images_lib
from kosmos_jax.processing import processor as processor_lib

IOU_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Example:
  image: np.ndarray  # [H, W, 3] uint8
  expression: str
  box: grounding.Box  # normalized
  key: str = ""


@dataclasses.dataclass(frozen=True)
class Prediction:
  example: Example
  text: str  # the generated caption after `</image>`, markup kept
  box: grounding.Box | None
  iou: float

  @property
  def correct(self) -> bool:
    return self.iou >= IOU_THRESHOLD


def prompt(expression: str) -> str:
  return f"<grounding><phrase>{expression}</phrase>"


def first_box(text: str, num_patches_per_side: int) -> grounding.Box | None:
  """The first box of the first entity that has one (None: no box)."""
  _, entities = grounding.clean_text_and_extract_entities(text, num_patches_per_side)
  return next((boxes[0] for _, _, boxes in entities if boxes), None)


def processor_for(vocab, model_config: ml_collections.ConfigDict) -> processor_lib.Processor:
  """A processor for a model trained on our pipeline: square pictures at the
  vision tower's size, as many slots as latents, prompts padded on the left."""
  size = model_config.vision.image_size
  options = images_lib.ImageOptions(size=(size, size), crop_size=(size, size))
  return processor_lib.Processor(
    vocab, options, num_image_tokens=model_config.latent_query_num, padding_side="left"
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


def predict(
  model,
  processor: processor_lib.Processor,
  examples: Sequence[Example],
  *,
  batch_size: int = 64,
  max_new_tokens: int = 8,
) -> list[Prediction]:
  """Greedy answers, `batch_size` prompts at a time."""
  side = processor.vocab.num_patches_per_side
  decoded = greedy_decode(
    model,
    processor,
    [prompt(e.expression) for e in examples],
    [e.image for e in examples],
    batch_size=batch_size,
    max_new_tokens=max_new_tokens,
  )
  predictions = []
  for example, raw in zip(examples, decoded):
    text = processor.post_process_generation(raw, cleanup_and_extract=False)
    box = first_box(text, side)
    predictions.append(
      Prediction(example, text, box, 0.0 if box is None else boxes_lib.iou(box, example.box))
    )
  return predictions


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


def metrics(predictions: Iterable[Prediction]) -> dict[str, float]:
  predictions = list(predictions)
  n = max(len(predictions), 1)
  return {
    "rec_accuracy": sum(p.correct for p in predictions) / n,
    "rec_mean_iou": sum(p.iou for p in predictions) / n,
    "rec_no_box": sum(p.box is None for p in predictions) / n,
    "rec_count": len(predictions),
  }


def evaluate_task(
  model,
  task: str,
  split: str = "validation",
  num_images: int | None = None,
  batch_size: int = 64,
  max_new_tokens: int = 8,
) -> dict[str, float]:
  """`metrics` of `model` on a task's split (the keys of config.rec)."""
  processor = processor_for(loader.vocabulary(task), model.config)
  return metrics(
    predict(
      model,
      processor,
      task_examples(task, split, num_images),
      batch_size=batch_size,
      max_new_tokens=max_new_tokens,
    )
  )
