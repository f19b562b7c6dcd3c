"""Few-shot demonstrations: K (image, text) pairs of a train split before each query.

KOSMOS-1 draws its demonstrations at random from the training set (reference
evaluation.md 7); here each query's draw is seeded by `seed` and the query's
id, so a query gets the same demonstrations whatever else is evaluated.
"""

import collections
import zlib
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np

from kosmos_jax import errors


def check_few_shot(shots, seed) -> None:
  """`shots` and `seed` as `load` takes them, or a `UserError` naming the bad one."""
  for name, value in (("shots", shots), ("seed", seed)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise errors.UserError(f"{name} must be an integer >= 0, got {value!r}")


def query_number(key: str) -> int:
  """A stable integer for a query id: the id itself when it is a number (COCO
  ids, Flickr photo ids, question ids), else the CRC-32 of its UTF-8 text."""
  return int(key) if key.isascii() and key.isdigit() else zlib.crc32(key.encode("utf-8"))


class DemonstrationPool:
  """The (image, text) pairs that few-shot demonstrations are drawn from.

  `draw` takes `shots` distinct pairs for one query, in the order drawn, with
  `np.random.default_rng([seed, query_number(key)])`; a pair with the query's
  own image is never drawn.
  """

  def __init__(self, pairs: Iterable[tuple[Any, str]], source: str):
    self.pairs = tuple(pairs)
    self.source = source  # the file the pairs came from, for error messages
    self._positions = collections.defaultdict(list)  # image -> its pairs' indices, ascending
    for i, (image, _) in enumerate(self.pairs):
      if isinstance(image, Hashable):
        self._positions[image].append(i)

  def __len__(self) -> int:
    return len(self.pairs)

  def draw(self, shots: int, seed: int, key: str, image: Any) -> tuple[tuple[Any, str], ...]:
    if not shots:
      return ()
    own = self._positions.get(image, []) if isinstance(image, Hashable) else []
    allowed = len(self.pairs) - len(own)
    if allowed < shots:
      raise errors.UserError(
        f"{self.source}: {allowed} demonstrations other than query {key}'s image for {shots} shots"
      )
    rng = np.random.default_rng([seed, query_number(key)])
    out = []
    for n in rng.choice(allowed, size=shots, replace=False):
      i = int(n)
      for taken in own:  # the n-th index that is not the query's image
        if i < taken:
          break
        i += 1
      out.append(self.pairs[i])
    return tuple(out)
