"""MultimodalFeatureConverter: shift, packing, positions, images per row, no leaks."""

import numpy as np
import pytest
import tensorflow as tf

from kosmos_jax.data.feature_converter import MultimodalFeatureConverter

S = 32  # image side (the tiny model's)


def _example(tokens, slots_at=None, image_value=0.0):
  """A sequence; `slots_at` = index of an `<image>` followed by 8 slots and `</image>`."""
  tokens = list(tokens)
  mask = [0] * len(tokens)
  images = np.zeros([0, 3, S, S], np.float32)
  if slots_at is not None:
    mask[slots_at + 1 : slots_at + 9] = [1] * 8
    images = np.full([1, 3, S, S], image_value, np.float32)
  return dict(
    targets=np.array(tokens, np.int32),
    loss_weights=np.array([0] + [1] * (len(tokens) - 1), np.int32),
    image_mask=np.array(mask, np.int32),
    images=images,
  )


def _convert(examples, length, max_images, pack=True):
  spec = dict(
    targets=tf.TensorSpec([None], tf.int32),
    loss_weights=tf.TensorSpec([None], tf.int32),
    image_mask=tf.TensorSpec([None], tf.int32),
    images=tf.TensorSpec([None, 3, S, S], tf.float32),
  )
  ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec)
  converter = MultimodalFeatureConverter(pack=pack)
  return list(converter(ds, {"targets": length, "images": max_images}).as_numpy_iterator())


def test_packing_layout():
  a = _example([0, 10, 11, 12, 2])
  b = _example([0, 20, 21, 2])
  c = _example([0, 30, 31, 32, 33, 34, 2])
  rows = _convert([a, b, c], length=8, max_images=1)
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]["input_ids"], [0, 10, 11, 12, 0, 20, 21, 1])
  np.testing.assert_array_equal(rows[0]["targets"], [10, 11, 12, 2, 20, 21, 2, 1])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(rows[0]["position_ids"], [2, 3, 4, 5, 2, 3, 4, 1])
  np.testing.assert_array_equal(rows[0]["loss_weights"], [1, 1, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1] * 6 + [0, 0])
  unpacked = _convert([a, b, c], length=8, max_images=1, pack=False)
  assert len(unpacked) == 3 and all(r["segment_ids"].max() == 1 for r in unpacked)


def test_images_follow_their_sequences_and_budget():
  seqs = [_example([0, 9, *[4] * 8, 8, 5, 2], slots_at=1, image_value=v) for v in (1.0, 2.0, 3.0)]
  rows = _convert(seqs, length=40, max_images=2)
  assert [r["segment_ids"].max() for r in rows] == [2, 1]  # the third image starts a new row
  np.testing.assert_array_equal(rows[0]["pixel_values"][:, 0, 0, 0], [1.0, 2.0])
  np.testing.assert_array_equal(rows[1]["pixel_values"][:, 0, 0, 0], [3.0, 0.0])
  mask = rows[0]["image_embeds_position_mask"]
  assert mask.sum() == 16 and mask[2:10].all() and mask[14:22].all()


def test_too_long_sequence_is_an_error():
  with pytest.raises(tf.errors.InvalidArgumentError, match="trim"):
    _convert([_example(range(20))], length=8, max_images=1)


def test_packed_row_equals_sequences_alone():
  from flax import nnx

  from configs import tiny
  from kosmos_jax.models.kosmos import Kosmos2

  config = tiny.get_config()
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  seqs = [
    _example(
      [0, 1100, *range(4, 12), 1101, *rng.integers(100, 900, n), 2], slots_at=1, image_value=v
    )
    for n, v in ((5, 0.5), (3, -0.5))
  ]
  for s in seqs:
    s["images"] = rng.normal(size=s["images"].shape).astype(np.float32)
  row = _convert(seqs, length=40, max_images=2)[0]
  assert row["segment_ids"].max() == 2
  batch = lambda r: {
    k: r[k][None]
    for k in (
      "input_ids",
      "pixel_values",
      "image_embeds_position_mask",
      "position_ids",
      "segment_ids",
    )
  }
  packed = np.asarray(model(**batch(row)).logits[0])
  start = 0
  for s in seqs:
    alone = _convert([s], length=len(s["targets"]) - 1, max_images=1)[0]
    n = len(s["targets"]) - 1
    np.testing.assert_allclose(
      packed[start : start + n], np.asarray(model(**batch(alone)).logits[0]), atol=1e-4
    )
    start += n
