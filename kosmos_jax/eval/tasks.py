"""The evaluation tasks by name: which module scores each, and its file names.

A `Task` forwards to its module's functions (see `eval/common.py`), with the
keyword arguments that pick one of the module's tasks (refcoco vs refcoco+).
"""

import dataclasses
import importlib
import inspect
from types import ModuleType
from typing import Any

from kosmos_jax import errors


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  module_name: str  # under kosmos_jax.eval
  predictions_file: str  # the field's own file for this task's predictions
  fixed: dict = dataclasses.field(default_factory=dict)  # load() arguments that name the task

  @property
  def module(self) -> ModuleType:
    return importlib.import_module(f"kosmos_jax.eval.{self.module_name}")

  def data_args(self) -> list[str]:
    """The keyword arguments `load` takes from the user (files, directories)."""
    params = inspect.signature(self.module.load).parameters
    return [
      n
      for n, p in params.items()
      if p.kind == p.KEYWORD_ONLY and n not in self.fixed and n != "strict"
    ]

  def load(self, split: str, num: int | None = None, *, strict: bool = False, **data_args):
    unknown = sorted(set(data_args) - set(self.data_args()))
    if unknown:
      raise errors.UserError(
        f"task {self.name} takes no {', '.join('--' + k.replace('_', '-') for k in unknown)} "
        f"(it takes {', '.join('--' + k.replace('_', '-') for k in self.data_args())})"
      )
    return self.module.load(split, num, strict=strict, **self.fixed, **data_args)

  def __getattr__(self, name: str) -> Any:
    # prediction, write_predictions, read_predictions, score, sums, from_sums
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self.module, name)


TASKS = {
  t.name: t
  for t in (
    Task("seqio_rec", "rec", "predictions.txt"),  # a seqio task's records (shapes)
    Task("flickr30k_entities", "flickr_entities", "predictions.txt"),
    Task("refcoco", "refexp", "predictions.txt", dict(task="refcoco")),
    Task("refcoco+", "refexp", "predictions.txt", dict(task="refcoco+")),
    Task("refcocog", "refexp", "predictions.txt", dict(task="refcocog")),
    Task("refcocog_reg", "reg", "predictions.json"),
    Task("coco_caption", "captions", "predictions.json", dict(task="coco_caption")),
    Task("flickr30k_caption", "captions", "predictions.json", dict(task="flickr30k_caption")),
    Task("vqav2", "vqa", "predictions.json"),
    Task("imagenet_zeroshot", "classification", "predictions.json"),
  )
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise errors.UserError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
  return TASKS[name]
