"""tf_image's shortcuts give what the full computation gives."""

import numpy as np
import pytest
import tensorflow as tf

from kosmos_jax.data import tf_image
from kosmos_jax.processing.images import CLIP_MEAN, CLIP_STD


@pytest.mark.parametrize("h,w", [(1, 1), (16, 16), (37, 100), (224, 224)])
def test_bicubic_resize_to_the_same_size_is_the_identity(h, w):
  pixels = np.random.default_rng(h * w).integers(0, 256, (h, w, 3)).astype(np.float32)
  resized = tf.image.resize(pixels, [h, w], method="bicubic", antialias=True)
  np.testing.assert_array_equal(resized, pixels)


def test_square_resize_gives_uint8_levels():
  pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
  resized = tf.image.resize(pixels.astype(np.float32), [16, 16], method="bicubic", antialias=True)
  out = tf_image.resize_square(tf.constant(pixels), 16)
  assert out.dtype == tf.uint8
  np.testing.assert_array_equal(
    out, tf.round(tf.clip_by_value(resized, 0.0, 255.0)).numpy().astype(np.uint8)
  )
  square = pixels[:, :20]
  np.testing.assert_array_equal(tf_image.resize_square(tf.constant(square), 20), square)


def test_normalize_uint8_equals_the_float_formula():
  pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
  expected = (pixels.astype(np.float32) / np.float32(255) - np.float32(CLIP_MEAN)) / np.float32(
    CLIP_STD
  )
  np.testing.assert_array_equal(
    tf_image.normalize(tf.constant(pixels)), expected.transpose(2, 0, 1)
  )
