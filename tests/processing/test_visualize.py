"""Boxes land where the entities say."""

import numpy as np

from kosmos_jax.processing import visualize


def test_boxes_are_drawn_at_their_coordinates():
  image = np.zeros((100, 200, 3), np.uint8)
  entities = [("a dog", (0, 5), [(0.25, 0.5, 0.75, 1.0)]), ("", (6, 6), [(0.0, 0.0, 0.1, 0.1)])]
  out = np.asarray(visualize.draw_entities(image, entities, min_size=100))
  assert out.shape == (100, 200, 3)
  # The first box's left edge (x = 50) is coloured, its inside (x = 100) is not.
  assert out[90, 50].any() and not out[90, 100].any()
  assert out[2, 2].any()  # the second entity, unnamed, still gets a box


def test_small_images_are_upscaled_for_legible_labels():
  out = visualize.draw_entities(np.zeros((32, 32, 3), np.uint8), [("x", (0, 1), [(0, 0, 1, 1)])])
  assert out.size == (224, 224)


def test_a_label_near_the_right_edge_stays_in_the_picture():
  image = np.zeros((224, 224, 3), np.uint8)
  label = "a yellow triangle at the right"
  out = np.asarray(visualize.draw_entities(image, [(label, (0, 1), [(0.9, 0.5, 1.0, 0.6)])]))
  # The label's filled background ends at the right edge; it starts well left of the box.
  row = out[int(0.5 * 224) - 6]
  filled = np.flatnonzero(row.any(-1))
  assert filled.max() >= 220 and filled.min() < 0.9 * 224 - 100
