"""Why REC on shapes pictures misses, by kind of miss.

`make demo` reports these beside its REC accuracy. The largest share of its
misses is the other shape of the same colour ("the red circle" answered with
the red square's box): the colour is easy to see, the kind is not. A miss
(IoU < 0.5) is, in this order:

  no_box       the answer has no box;
  same_colour  the box fits another shape of the picture better than the named
               one (IoU >= 0.3), and that shape has the named colour;
  same_kind    ... the named kind;
  other_shape  ... neither;
  near         every box edge within 1.5 grid cells of the named shape's;
  off          the rest.

`shared_colour_accuracy` is REC accuracy over the expressions whose colour
another shape in the picture has: the part of REC that needs the kind.
"""

from collections.abc import Sequence

from kosmos_jax.eval import boxes as boxes_lib
from kosmos_jax.eval import rec, shapes_captions

KINDS = ("no_box", "same_colour", "same_kind", "other_shape", "near", "off")
OTHER_SHAPE_IOU = 0.3
NEAR_CELLS = 1.5


def miss_kind(box, name: tuple[str, str], objects: dict, side: int) -> str:
  """The kind of a miss: `box` answered for the shape `name` = (colour, kind)
  among the picture's `objects` {(colour, kind): box}; `side` grid cells per side."""
  if box is None:
    return "no_box"
  others = {n: boxes_lib.iou(box, b) for n, b in objects.items() if n != name}
  best = max(others, key=others.get, default=None)
  if best is not None and others[best] >= OTHER_SHAPE_IOU:
    if others[best] > boxes_lib.iou(box, objects[name]):
      if best[0] == name[0]:
        return "same_colour"
      return "same_kind" if best[1] == name[1] else "other_shape"
  error = max(abs(a - b) for a, b in zip(box, objects[name]))
  return "near" if error * side <= NEAR_CELLS else "off"


def misses(examples: Sequence[rec.Example], boxes: Sequence, side: int) -> dict:
  """`rec_misses` {kind: count} and `shared_colour_accuracy` (with its count)
  over `examples` and the first box answered for each (None: no box)."""
  pictures = shapes_captions.objects_by_picture(examples)
  counts = dict.fromkeys(KINDS, 0)
  shared_hits = shared = 0
  for e, box in zip(examples, boxes, strict=True):
    name = shapes_captions.shape_named(e.expression)
    objects = pictures[e.key]
    hit = box is not None and boxes_lib.iou(box, e.box) >= shapes_captions.IOU_THRESHOLD
    if any(n[0] == name[0] for n in objects if n != name):
      shared += 1
      shared_hits += hit
    if not hit:
      counts[miss_kind(box, name, objects, side)] += 1
  return dict(
    rec_misses=counts,
    shared_colour_accuracy=shared_hits / max(shared, 1),
    shared_colour_count=shared,
  )
