"""The demo's REC misses by kind, and its accuracy where the colour is shared."""

import pytest

from kosmos_jax.eval import rec, shapes_misses

SIDE = 16  # cells of 1/16
RED_CIRCLE = (0.0, 0.0, 0.25, 0.25)
RED_SQUARE = (0.5, 0.0, 0.75, 0.25)
BLUE_SQUARE = (0.0, 0.5, 0.25, 0.75)
GREEN_CIRCLE = (0.5, 0.5, 0.75, 0.75)
OBJECTS = {
  ("red", "circle"): RED_CIRCLE,
  ("red", "square"): RED_SQUARE,
  ("blue", "square"): BLUE_SQUARE,
  ("green", "circle"): GREEN_CIRCLE,
}


@pytest.mark.parametrize(
  "box, kind",
  [
    (None, "no_box"),
    (RED_SQUARE, "same_colour"),
    (GREEN_CIRCLE, "same_kind"),
    # the blue square is neither the red circle's colour nor its kind
    (BLUE_SQUARE, "other_shape"),
    # every edge 1.5 cells off (IoU 0.24): near; 2 cells: off
    (tuple(v + 1.5 / SIDE for v in RED_CIRCLE), "near"),
    (tuple(v + 2 / SIDE for v in RED_CIRCLE), "off"),
    # IoU 0.14 with the red square is under 0.3: not counted as that shape
    ((0.3125, 0.0, 0.5625, 0.25), "off"),
  ],
)
def test_miss_kinds(box, kind):
  assert shapes_misses.miss_kind(box, ("red", "circle"), OBJECTS, SIDE) == kind


def test_counts_and_the_accuracy_where_the_colour_is_shared():
  names = ["the red circle", "the red square", "the blue square", "the green circle"]
  examples = [rec.Example(None, n, b, "k") for n, b in zip(names, OBJECTS.values())]
  # red circle right; red square answered with the circle (same colour);
  # blue square right; green circle answered nowhere.
  answered = [RED_CIRCLE, RED_CIRCLE, BLUE_SQUARE, None]
  result = shapes_misses.misses(examples, answered, SIDE)
  assert result["rec_misses"] == dict(
    no_box=1, same_colour=1, same_kind=0, other_shape=0, near=0, off=0
  )
  # Only the two red shapes share their colour; one of them is right.
  assert result["shared_colour_accuracy"] == 0.5 and result["shared_colour_count"] == 2
