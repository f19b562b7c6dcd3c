"""Image ops in TensorFlow for the seqio pipelines: check, decode, resize, crop, normalize.

Two transforms (reference/kosmos2.md 2.6):
  "square": bicubic resize to S x S ignoring the aspect ratio (inference and
            Hugging Face's processor; `images.preprocess_image` is its numpy twin);
  "crop":   bicubic resize of the shortest edge to S, then a centre S x S crop
            (the original training transform); boxes follow the crop and a box
            keeping less than `MIN_BOX_FRACTION` of its area is dropped.
Resizing uses antialiasing (as PIL does when shrinking) and rounds to whole
pixel levels (PIL resizes uint8 images). Output is float32 [3, S, S] (NCHW rows,
as the model takes them), normalized with the CLIP mean and std.
"""

import tensorflow as tf

from kosmos_jax.data import quality
from kosmos_jax.processing.images import CLIP_MEAN, CLIP_STD

MIN_BOX_FRACTION = 0.2  # laion2b_obj_loader's drop_crop_thr
_TAIL = 1024  # how far from the end a JPEG's EOI marker may sit
_MAGIC = {  # format -> (offset, bytes)
  "jpeg": (0, b"\xff\xd8\xff"),
  "png": (0, b"\x89PNG\r\n\x1a\n"),
  "gif87": (0, b"GIF87a"),
  "gif89": (0, b"GIF89a"),
  "riff": (0, b"RIFF"),
  "webp": (8, b"WEBP"),
  "bmp": (0, b"BM"),
}
_IMAGE_REASONS = ("image_missing", "image_unknown_format", "image_truncated", "image_zero_size")


def _has(head: tf.Tensor, name: str) -> tf.Tensor:
  offset, magic = _MAGIC[name]
  return tf.equal(tf.strings.substr(head, offset, len(magic)), magic)


def _uint(head_bytes: tf.Tensor, start: int, size: int, big_endian: bool) -> tf.Tensor:
  """Unsigned integer from `size` header bytes at `start` (constant place
  values: a few ops, each of which costs start-up time)."""
  weights = [256**i for i in range(size)]
  weights = weights[::-1] if big_endian else weights
  return tf.reduce_sum(tf.cast(head_bytes[start : start + size], tf.int64) * weights)


def check_image_bytes(data: tf.Tensor) -> tf.Tensor:
  """`_issues` vector with at most one image reason for encoded image `data`.

  Cheap header and trailer checks, so that records that would make the decoder
  raise are counted by reason and dropped instead (see quality.REASONS).
  """
  size = tf.strings.length(data)
  # Zero padding on both sides keeps every substr in range for short inputs.
  padded = tf.strings.join([tf.constant(b"\0" * _TAIL), data, tf.constant(b"\0" * 32)])
  head = tf.strings.substr(padded, _TAIL, 32)
  head_bytes = tf.io.decode_raw(head, tf.uint8)
  tail_bytes = tf.io.decode_raw(tf.strings.substr(padded, size, _TAIL), tf.uint8)
  is_jpeg, is_png = _has(head, "jpeg"), _has(head, "png")
  is_gif = _has(head, "gif87") | _has(head, "gif89")
  is_webp = _has(head, "riff") & _has(head, "webp")
  is_bmp = _has(head, "bmp")
  known = is_jpeg | is_png | is_gif | is_webp | is_bmp
  jpeg_end = tf.reduce_any((tail_bytes[:-1] == 0xFF) & (tail_bytes[1:] == 0xD9))
  png_end = tf.equal(tf.strings.substr(padded, size + _TAIL - 8, 4), b"IEND")
  gif_end = tf.equal(tail_bytes[-1], 0x3B)
  riff_size = _uint(head_bytes, 4, 4, big_endian=False) + 8
  bmp_size = _uint(head_bytes, 2, 4, big_endian=False)
  # Every check is computed and the format picks one: selects instead of
  # tf.case, whose branch functions cost start-up and per-record time.
  size64 = tf.cast(size, tf.int64)
  complete = tf.where(
    is_jpeg,
    jpeg_end,
    tf.where(
      is_png,
      png_end,
      tf.where(
        is_gif,
        gif_end,
        tf.where(is_webp, size64 >= riff_size, tf.where(is_bmp, size64 >= bmp_size, True)),
      ),
    ),
  )
  png_area = _uint(head_bytes, 16, 4, True) * _uint(head_bytes, 20, 4, True)
  gif_area = _uint(head_bytes, 6, 2, False) * _uint(head_bytes, 8, 2, False)
  zero = (is_png & tf.equal(png_area, 0)) | (is_gif & tf.equal(gif_area, 0))
  # The first failed check, in this order, is the reason.
  failed = tf.stack([tf.equal(size, 0), ~known, ~complete, zero])
  reason = tf.gather(
    [quality.reason_index(n) for n in _IMAGE_REASONS], tf.argmax(tf.cast(failed, tf.int32))
  )
  return tf.cast(tf.reduce_any(failed), tf.int32) * tf.one_hot(
    reason, len(quality.REASON_NAMES), dtype=tf.int32
  )


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG/GIF (first frame)/WebP/BMP bytes -> uint8 [h, w, 3].

  Grey is repeated to three channels; transparency is composited onto white,
  as transformers' `convert_rgb` does.
  """
  image = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
  # Pixels stay uint8 until `normalize`: a quarter of the float32 memory traffic.
  return tf.cond(tf.equal(tf.shape(image)[-1], 3), lambda: image, lambda: _to_rgb(image))


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  image = tf.cast(image, tf.float32)
  channels = tf.shape(image)[-1]
  rgb = tf.cond(channels < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
  alpha = tf.cond(
    tf.equal(channels % 2, 0), lambda: image[..., -1:] / 255.0, lambda: tf.ones_like(image[..., :1])
  )
  return tf.cast(tf.round(alpha * rgb + (1.0 - alpha) * 255.0), tf.uint8)


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  """Bicubic resize to whole pixel levels, in `image`'s dtype."""

  def resize():
    resized = tf.image.resize(image, tf.stack([height, width]), method="bicubic", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), image.dtype)

  # At the same size the bicubic kernel weighs only the pixel itself (weights
  # 1, 0, 0, 0): resizing would return the image unchanged, as PIL does.
  same = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.stack([height, width])))
  return tf.cond(same, lambda: image, resize)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """[..., h, w, 3] pixel levels -> CLIP-normalized float32 [..., 3, h, w]."""
  # Channels first before the cast (the smaller dtype moves fewer bytes), by
  # unstacking and stacking: a third of tf.transpose's time for 3 channels.
  image = tf.cast(tf.stack(tf.unstack(image, 3, axis=-1), axis=-3), tf.float32)
  return (image / 255.0 - tf.constant(CLIP_MEAN, shape=[3, 1, 1])) / tf.constant(
    CLIP_STD, shape=[3, 1, 1]
  )


def resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
  """The inference transform's geometry: size x size, aspect ratio ignored."""
  return _resize(image, size, size)


def resize_and_center_crop(image: tf.Tensor, size: int):
  """The training transform's geometry.

  Args:
    image: [h, w, 3] pixel levels (uint8 or float).
    size: S; the shortest edge is resized to S (the longer one to
      int(S * long / short), as PIL-based processors do), then centre-cropped.

  Returns:
    (image [S, S, 3], geometry float32 [2, 4]: the scale and shift that carry
    normalized (x1, y1, x2, y2) boxes into the crop, for `crop_boxes`).
  """
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  long_side = tf.cast(tf.floor(size * tf.maximum(h, w) / tf.minimum(h, w)), tf.int32)
  new_h = tf.where(h <= w, size, long_side)
  new_w = tf.where(h <= w, long_side, size)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  image = _resize(image, new_h, new_w)[top : top + size, left : left + size]
  scale = tf.cast(tf.stack([new_w, new_h, new_w, new_h]), tf.float32) / size
  shift = tf.cast(tf.stack([left, top, left, top]), tf.float32) / size
  return image, tf.stack([scale, shift])


def crop_boxes(boxes: tf.Tensor, geometry: tf.Tensor):
  """Boxes [n, 4] through the crop of `resize_and_center_crop`, each with its
  own geometry [n, 2, 4] (or one [2, 4] for all).

  Returns (boxes clipped to the crop, keep [n] bool: the box keeps at least
  MIN_BOX_FRACTION of its area).
  """
  moved = tf.reshape(boxes, [-1, 4]) * geometry[..., 0, :] - geometry[..., 1, :]
  clipped = tf.clip_by_value(moved, 0.0, 1.0)
  area = lambda b: tf.maximum(b[:, 2] - b[:, 0], 0.0) * tf.maximum(b[:, 3] - b[:, 1], 0.0)
  keep = area(clipped) >= MIN_BOX_FRACTION * area(moved)
  return clipped, keep & (area(clipped) > 0)


def decode_resized(data: tf.Tensor, size: int, transform: str = "square"):
  """Encoded bytes -> (uint8 [S, S, 3], crop geometry for `crop_boxes`, None
  for "square", which keeps every box as it is)."""
  image = decode_rgb(data)
  if transform == "square":
    return tf.ensure_shape(resize_square(image, size), [size, size, 3]), None
  if transform == "crop":
    image, geometry = resize_and_center_crop(image, size)
    return tf.ensure_shape(image, [size, size, 3]), geometry
  raise ValueError(f"transform must be 'square' or 'crop', got {transform!r}")


def preprocess(data: tf.Tensor, size: int, transform: str = "square") -> tf.Tensor:
  """Encoded bytes -> pixels float32 [3, S, S] for `transform`."""
  return normalize(decode_resized(data, size, transform)[0])
