"""Box geometry shared by the evaluators. Boxes are `(x1, y1, x2, y2)`, any units."""

from collections.abc import Sequence


def area(box: Sequence[float]) -> float:
  """Area; a reversed or flat box has none."""
  x1, y1, x2, y2 = box
  return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
  """Intersection over union; 0 when the union is empty."""
  inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0
