"""Grounded captions of shapes pictures, scored against the shapes in each picture.

`make demo`'s caption score. A caption is right when it grounds at least one
phrase, each phrase names the colour and kind of a shape that is in the
picture ("a yellow circle"), no shape is named twice, and each phrase's first
box has IoU >= 0.5 with the shape it names. The pictures' shapes come from
their REC examples ("the yellow circle" and its box), which list every shape.
"""

import re
from collections.abc import Sequence

from kosmos_jax.data import shapes
from kosmos_jax.eval import boxes as boxes_lib
from kosmos_jax.eval import rec

IOU_THRESHOLD = 0.5
_NAME = re.compile(rf"\b({'|'.join(shapes.COLOURS)})\s+({'|'.join(shapes.SHAPES)})\b")


def shape_named(text: str) -> tuple[str, str] | None:
  """(colour, kind) of the first shape `text` names, e.g. ("red", "circle")."""
  match = _NAME.search(text)
  return (match.group(1), match.group(2)) if match else None


def objects_by_picture(examples: Sequence[rec.Example]) -> dict[str, dict]:
  """key -> {(colour, kind): box} of each picture, from its REC examples."""
  pictures = {}
  for e in examples:
    name = shape_named(e.expression)
    if name is None:
      raise ValueError(f"{e.key}: {e.expression!r} names no shapes-dataset shape")
    pictures.setdefault(e.key, {})[name] = e.box
  return pictures


def caption_correct(entities: Sequence, objects: dict) -> bool:
  """`entities` as `post_process_generation` gives them: (phrase, span, boxes)."""
  named = set()
  for phrase, _, boxes in entities:
    name = shape_named(phrase)
    if name is None or name not in objects or name in named or not boxes:
      return False
    if boxes_lib.iou(boxes[0], objects[name]) < IOU_THRESHOLD:
      return False
    named.add(name)
  return bool(named)


def score(captions: dict[str, Sequence], objects: dict[str, dict]) -> dict:
  """`caption_score` (fraction right) over the pictures in `captions` (key -> entities)."""
  right = sum(caption_correct(entities, objects[key]) for key, entities in captions.items())
  return dict(caption_score=right / max(len(captions), 1), caption_count=len(captions))
