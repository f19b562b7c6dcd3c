"""Pictures of grounding predictions: the predicted boxes beside the true ones.

For the tasks whose truth has boxes per query (`refexp`: one per expression,
`flickr_entities`: every box of the phrase's chain), `kosmos-jax eval` draws a
few queries so a user sees what the numbers mean.
"""

import os

from kosmos_jax.eval import common, official_boxes
from kosmos_jax.processing import images as images_lib
from kosmos_jax.processing import visualize


def _true_boxes(truth, index: int):
  """(phrase, pixel boxes, width, height) of query `index`, or None (no boxes)."""
  if hasattr(truth, "expressions"):
    e = truth.expressions[index]
    return e.text, [e.box], e.width, e.height
  if hasattr(truth, "phrases"):
    p = truth.phrases[index]
    return p.text, list(p.boxes), p.width, p.height
  return None


def _scale(box, size) -> tuple:
  return tuple(v / s for v, s in zip(box, size))


def draw(dataset: common.Dataset, predictions: dict[int, str], out: str, num: int = 8) -> list:
  """`out/NN.png` for the first `num` predicted queries; the paths written."""
  written = []
  for index in sorted(predictions):
    if len(written) == num:
      break
    found = _true_boxes(dataset.truth, index)
    if found is None:
      return written
    phrase, truth, width, height = found
    side = dataset.truth.num_patches_per_side
    predicted = official_boxes.matching_boxes(predictions[index], phrase, width, height, side)
    size = (width, height, width, height)
    entities = [(f"true: {phrase}", (0, 0), [_scale(b, size) for b in truth])]
    hits = [b for b in predicted if b != official_boxes.MISS]
    if hits:
      entities.append((f"predicted: {phrase}", (0, 0), [_scale(b, size) for b in hits]))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{len(written):02d}.png")
    image = images_lib.to_rgb(dataset.queries[index].image)
    visualize.draw_entities(image, entities).save(path)
    written.append(path)
  return written
