"""What the official KOSMOS-2 phrase-grounding and REC scorers share.

Both scorers (`evaluation/flickr_entities/flickr_entities_evaluate.py`,
`evaluation/refcoco/refexp_evaluate.py`; reference/evaluation.md 1.3, 1.4, 11)
read MDETR annotation files and `H-<i>` hypothesis lines, decode every
`<phrase>..</phrase>` + `<object>..</object>` of a hypothesis
(`decode_string.py`), keep the boxes whose phrase equals the query's after
`strip()`, scale them to the picture's pixels and count a hit when the IoU is
at least 0.5.

`boxes.iou` gives a reversed box no area where the scorers' torchvision-style
IoU lets its area go negative; a reversed box never intersects, so either way
it scores no hit.
"""

import json
import os
import re
from collections.abc import Mapping, Sequence

from kosmos_jax import errors
from kosmos_jax.eval import boxes as boxes_lib
from kosmos_jax.eval import common
from kosmos_jax.processing import grounding

IOU_THRESHOLD = 0.5  # `>=`, as both scorers compare (the papers say "greater than")
MISS = (0.0, 0.0, 0.0, 0.0)  # the scorers' stand-in when no box matches: IoU 0
# Characters that would split or end an H-line (text-mode reading turns "\r" into "\n").
_LINE_BREAKS = str.maketrans({"\n": " ", "\r": " ", "\t": " "})


def decode(text: str, num_patches_per_side: int = 32) -> list[tuple[str, grounding.Box]]:
  """Every `(phrase, normalized box)` of `text`, in order of appearance.

  Each location pair of an `<object>` gives one entry; an `<object>` without a
  phrase is named `"<ul><lr>"` (e.g. `"<44><863>"`) as the official decoder
  names it, so it never matches a real phrase. A malformed sequence (a lone
  index, a phrase not right before `<object>`) gives nothing. Unlike the
  official decoder, which overflows, a pair with an absurdly long number is
  dropped (`grounding.extract_entities_with_patch_indices`).
  """
  out = []
  for name, _, pairs in grounding.extract_entities_with_patch_indices(text):
    for ul, lr in pairs:
      # A phrase cannot contain "<", so "<" marks a phrase-less object.
      label = f"<{ul}><{lr}>" if name.startswith("<") else name
      out.append((label, grounding.patch_indices_to_box(ul, lr, num_patches_per_side)))
  return out


def matching_boxes(
  text: str, phrase: str, width: float, height: float, num_patches_per_side: int = 32
) -> list[grounding.Box]:
  """The pixel boxes of `text` whose phrase is `phrase` (both stripped), in
  order of appearance; `[MISS]` when there are none, which the scorers count
  as a wrong answer rather than dropping the query."""
  found = [
    (x1 * width, y1 * height, x2 * width, y2 * height)
    for name, (x1, y1, x2, y2) in decode(text, num_patches_per_side)
    if name.strip() == phrase.strip()
  ]
  return found or [MISS]


def best_iou(predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> float:
  """The largest IoU of any predicted box with any true box (ANY-BOX)."""
  return max((boxes_lib.iou(p, t) for p in predicted for t in truth), default=0.0)


def hit(predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> bool:
  return best_iou(predicted, truth) >= IOU_THRESHOLD


def hypothesis(prompt: str, continuation: str) -> str:
  """The H-line text for a query: the prompt and the model's continuation.

  The official driver forces the prompt as a prefix, so its hypotheses hold
  the prompt too (reference/evaluation.md 1.2), and the phrase the prompt ends
  with is what the continuation's first `<object>` attaches to. Line breaks and
  tabs become spaces, so that one answer stays one line.
  """
  return (prompt + continuation).translate(_LINE_BREAKS)


# The task functions of the H-line tasks (flickr_entities, refexp, rec).


def prediction(query: common.Query, continuation: str) -> str:
  """The H-line text: the whole hypothesis, prompt included, as the official driver's."""
  return hypothesis(query.prompt, continuation)


def write_predictions(path: str, dataset: common.Dataset, predictions: Mapping[int, str]) -> None:
  common.write_hlines(path, len(dataset.queries), predictions)


def read_predictions(path: str, dataset: common.Dataset) -> dict[int, str]:
  return common.read_hlines(path, len(dataset.queries))


def read_mdetr_json(path: str, lists: Sequence[str]) -> dict:
  """An MDETR annotation file (COCO-style JSON) that has the top-level `lists`;
  anything else is refused naming the file."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise errors.UserError(f"{path}: cannot read the annotations: {e.strerror}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(f"{path}: not a JSON file ({e})") from None
  missing = [k for k in lists if not isinstance(data, dict) or not isinstance(data.get(k), list)]
  if missing:
    raise errors.UserError(
      f"{path}: not an MDETR annotation file: no {' or '.join(map(repr, missing))} list"
    )
  return data


def check_file_name(path: str, pattern: str, expected: tuple[str, ...]) -> None:
  """Refuses an MDETR annotation file whose name (`pattern`: a regex with one
  group per value of `expected`, e.g. task and split) says other values, such
  as a test file passed for val; a renamed file is not checked."""
  match = re.fullmatch(pattern, os.path.basename(path))
  if match and match.groups() != expected:
    said, wanted = "/".join(match.groups()), "/".join(expected)
    raise errors.UserError(f"{path}: the file name says {said}, not {wanted}")
