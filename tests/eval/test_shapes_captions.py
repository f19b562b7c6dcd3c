"""The demo's caption score: right shapes, each once, boxes on them."""

from kosmos_jax.eval import rec, shapes_captions

RED = (0.1, 0.1, 0.4, 0.4)
BLUE = (0.6, 0.6, 0.9, 0.9)


def _objects():
  examples = [
    rec.Example(None, "the red circle", RED, "k"),
    rec.Example(None, "the blue square", BLUE, "k"),
  ]
  return shapes_captions.objects_by_picture(examples)["k"]


def test_objects_come_from_the_rec_examples():
  assert _objects() == {("red", "circle"): RED, ("blue", "square"): BLUE}


def test_a_caption_is_right_only_with_real_shapes_once_and_boxes_on_them():
  objects = _objects()
  right = [("a red circle", (0, 12), [RED]), ("a blue square", (17, 30), [BLUE])]
  assert shapes_captions.caption_correct(right, objects)
  assert shapes_captions.caption_correct(right[:1], objects)  # naming some shapes is enough
  wrong = {
    "a shape not in the picture": [("a green circle", (0, 14), [RED])],
    "the wrong colour": [("a blue circle", (0, 13), [RED])],
    "a shape twice": [right[0], ("a red circle", (20, 32), [RED])],
    "a box on another shape": [("a red circle", (0, 12), [BLUE])],
    "a box that misses": [("a red circle", (0, 12), [(0.1, 0.1, 0.2, 0.2)])],
    "no phrase": [],
    "no box": [("a red circle", (0, 12), [])],
  }
  for why, entities in wrong.items():
    assert not shapes_captions.caption_correct(entities, objects), why


def test_score_is_the_fraction_right():
  objects = {"a": _objects(), "b": _objects()}
  captions = {"a": [("a red circle", (0, 12), [RED])], "b": [("a red square", (0, 12), [RED])]}
  assert shapes_captions.score(captions, objects) == dict(caption_score=0.5, caption_count=2)
