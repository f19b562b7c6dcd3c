"""Referring-expression comprehension on RefCOCO, RefCOCO+, RefCOCOg (KOSMOS-2 Table 3).

Tasks `refcoco`, `refcoco+`, `refcocog`, scored as the official
`refexp_evaluate.py` (reference/evaluation.md 3, 11): one query per
expression of MDETR's `finetune_{task}_{split}.json`, in file order, prompt
`<grounding><phrase>{expression}</phrase>` (`cook_data.py`). The hypothesis
after its last `</image>` is decoded; its boxes whose phrase is the
expression, in generation order, are the answer (none: a 0-area box, a miss).

* `accuracy` (the paper's number): the first such box has IoU >= 0.5.
* `accuracy_mean`: the box whose corners are the means of all such boxes' corners
  has IoU >= 0.5 (the scorer's `'mean'`; a mean box, not a mean IoU).
* `accuracy_upper_bound`: one of them has IoU >= 0.5.

The official scorer runs in float32 (torch) where this one uses float64; the
two can only differ for an IoU within float32 rounding of 0.5.
"""

import collections
import dataclasses
import os
from collections.abc import Mapping

from kosmos_jax import errors
from kosmos_jax.eval import common, official_boxes

TASKS = ("refcoco", "refcoco+", "refcocog")
# RefCOCO/RefCOCO+ use the UNC splits, RefCOCOg the UMD ones (MDETR's files).
SPLITS = {
  "refcoco": ("train", "val", "testA", "testB"),
  "refcoco+": ("train", "val", "testA", "testB"),
  "refcocog": ("train", "val", "test"),
}
PREDICTIONS_SUFFIX = "txt"
# The official run: greedy, no-repeat-ngram 3 (after the prompt), at most 500
# tokens in all; an expression's box needs 4 new tokens, 64 leaves room for more.
DECODING = common.Decoding(num_beams=1, max_new_tokens=64, no_repeat_ngram_size=3)

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Expression:
  """One query's truth: the expression, the referred box (pixels, x1 y1 x2 y2)
  and the picture's size."""

  text: str
  box: Box
  width: float
  height: float


@dataclasses.dataclass(frozen=True)
class Truth:
  expressions: list[Expression]  # one per query
  num_patches_per_side: int


def _row(image, annotation) -> tuple[str, str, float, float, Box]:
  """(expression, file_name, width, height, box) of an `images` entry and its
  `annotations` entry; raises KeyError, TypeError or ValueError."""
  expression, file_name = image["caption"], image["file_name"]
  if not isinstance(expression, str) or not isinstance(file_name, str):
    raise TypeError("caption and file_name must be strings")
  x, y, w, h = (float(v) for v in annotation["bbox"])  # COCO x, y, width, height
  return expression, file_name, float(image["width"]), float(image["height"]), (x, y, x + w, y + h)


def load(
  split: str = "val",
  num: int | None = None,
  *,
  annotations: str,
  image_dir: str,
  strict: bool = False,
  num_patches_per_side: int = 32,
  task: str = "refcoco",
) -> common.Dataset:
  """The first `num` expressions of a split.

  Args:
    split: "val", "testA", "testB" (RefCOCO, RefCOCO+); "val", "test" (RefCOCOg).
    num: expressions to read (None: all).
    annotations: MDETR `finetune_{task}_{split}.json`.
    image_dir: the COCO `train2014` folder: every RefCOCO/+/g picture is a
      train2014 one (the official cook picks `train2014/` by file name).
    strict: raise on the first bad record instead of counting it.
    num_patches_per_side: the model's location grid (32 for KOSMOS-2).
    task: "refcoco", "refcoco+" or "refcocog"; each row's `dataset_name`
      must say the same.
  """
  if task not in TASKS:
    raise errors.UserError(f"refexp: task {task!r}; the tasks are {TASKS}")
  if split not in SPLITS[task]:
    raise errors.UserError(f"{task}: split {split!r}; the splits are {SPLITS[task]}")
  official_boxes.check_file_name(
    annotations, r"finetune_(refcoco\+?|refcocog)_(\w+)\.json", (task, split)
  )
  data = official_boxes.read_mdetr_json(annotations, ("images", "annotations"))
  images, anns = data["images"], data["annotations"]
  if len(images) != len(anns):
    raise errors.UserError(
      f"{annotations}: {len(images)} images for {len(anns)} annotations; an MDETR REC file "
      "has one of each per expression"
    )

  queries, expressions, skipped = [], [], collections.Counter()
  for i, (image, ann) in enumerate(list(zip(images, anns))[:num]):
    where = f"{annotations}: images[{i}]/annotations[{i}]"
    if isinstance(image, dict) and image.get("dataset_name") != task:
      name = image.get("dataset_name")
      raise errors.UserError(f"{where}: dataset_name {name!r}, so the file is not for {task}")
    try:
      expression, file_name, width, height, box = _row(image, ann)
      same_image = image["id"] == ann["image_id"]
    except (KeyError, TypeError, ValueError):
      common.skip_or_raise(skipped, "row does not parse", where, strict)
      continue
    if not same_image:
      # The scorer pairs images[i] with annotations[i] and stops on a mismatch.
      common.skip_or_raise(skipped, "annotation is for another image", where, strict)
      continue
    queries.append(
      common.Query(
        key=str(len(queries)),
        image=os.path.join(image_dir, file_name),
        prompt=f"<grounding><phrase>{expression}</phrase>",
      )
    )
    expressions.append(Expression(expression, box, width, height))
  return common.Dataset(
    task=task,
    split=split,
    queries=queries,
    truth=Truth(expressions, num_patches_per_side),
    decoding=DECODING,
    skipped=skipped,
    source=annotations,
  )


# H-lines, as the official scorers read them.
prediction = official_boxes.prediction
write_predictions = official_boxes.write_predictions
read_predictions = official_boxes.read_predictions


def sums(dataset: common.Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  """Hits of the first, the mean and the best matching box, and queries scored."""
  truth = dataset.truth
  out = {"count": 0.0, "hits": 0.0, "hits_mean": 0.0, "hits_upper_bound": 0.0}
  for i, e in enumerate(truth.expressions):
    if i not in predictions:
      continue  # skipped by the runner: reported by skip_metrics, not a miss
    # The official scorer reads only what follows the last `</image>`.
    text = predictions[i].split("</image>")[-1]
    found = official_boxes.matching_boxes(
      text, e.text, e.width, e.height, truth.num_patches_per_side
    )
    mean = tuple(sum(corner) / len(found) for corner in zip(*found))
    out["count"] += 1
    out["hits"] += official_boxes.hit(found[:1], [e.box])
    out["hits_mean"] += official_boxes.hit([mean], [e.box])
    out["hits_upper_bound"] += official_boxes.hit(found, [e.box])
  return out


def from_sums(dataset: common.Dataset, sums: Mapping[str, float]) -> dict[str, float]:
  """`accuracy`, `accuracy_mean`, `accuracy_upper_bound` (left out when no
  query was scored, not 0), `count` and the skips."""
  n = sums["count"]
  out = {}
  if n:
    out["accuracy"] = sums["hits"] / n
    out["accuracy_mean"] = sums["hits_mean"] / n
    out["accuracy_upper_bound"] = sums["hits_upper_bound"] / n
  out["count"] = n
  # skip_metrics counts the queries with a prediction; the sums hold how many.
  out.update(common.skip_metrics(dataset, dict.fromkeys(range(int(n)), "")))
  return out


def score(dataset: common.Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  return from_sums(dataset, sums(dataset, predictions))
