"""Multimodal decoder-only feature converter: shift, pack, pad.

Task features (preprocessors.py): `targets` (`<s> ... </s>`), `loss_weights`,
`image_mask`, `images` [k, 3, S, S]. Task feature lengths: `targets` = L tokens
per row, `images` = N images per row.

Model features, one row each (the keyword arguments of models/kosmos.py):
  input_ids                   int32 [L]  tokens[:-1] of each packed sequence, pad 1 after
  targets                     int32 [L]  tokens[1:]: the token each position predicts
  loss_weights                float32 [L] weights of the predicted tokens, 0 on padding
  segment_ids                 int32 [L]  1, 2, ... per packed sequence, 0 = padding
  position_ids                int32 [L]  per sequence 2, 3, ... (fairseq: pad_id + 1
                                         onwards, as decoder.positions_from_ids); pads 1
  image_embeds_position_mask  int32 [L]  1 on image slots
  pixel_values                float32 [N, 3, S, S]  the row's images in slot order,
                                         zero images after them (never referenced)
Packing is greedy and in order: a sequence goes into the current row if its
tokens and images fit, else the row is emitted and a new one starts. The model
keeps packed sequences apart through `segment_ids` (attention) and
`position_ids`; images never cross rows.
"""
from typing import Mapping

import seqio
import tensorflow as tf

from kosmos_jax.data import vocab as vocab_lib

_Spec = seqio.FeatureConverter.FeatureSpec
_TOKEN_FEATURES = ("input_ids", "targets", "loss_weights", "image_embeds_position_mask")


class MultimodalFeatureConverter(seqio.FeatureConverter):
  """See the module doc. `pack=False` gives one sequence per row (segment id 1)."""

  TASK_FEATURES = {"targets": _Spec(tf.int32), "loss_weights": _Spec(tf.int32),
                   "image_mask": _Spec(tf.int32), "images": _Spec(tf.float32, rank=4)}
  MODEL_FEATURES = {"input_ids": _Spec(tf.int32), "targets": _Spec(tf.int32),
                    "loss_weights": _Spec(tf.float32), "image_embeds_position_mask": _Spec(tf.int32),
                    "pixel_values": _Spec(tf.float32, rank=4)}
  PACKING_FEATURE_DTYPES = {"segment_ids": tf.int32, "position_ids": tf.int32}

  def __init__(self, pack: bool = True, pad_id: int = vocab_lib.PAD_ID):
    super().__init__(pack=pack, apply_length_check=False)
    self._pad_id = pad_id

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    # seqio's checks assume rank-1 packable features; images are rank 4.
    if set(task_feature_lengths) != {"targets", "images"}:
      raise ValueError(f"task_feature_lengths needs 'targets' (tokens per row) and 'images' (images "
                       f"per row), got {dict(task_feature_lengths)}")
    missing = set(self.TASK_FEATURES) - set(ds.element_spec)
    if missing:
      raise ValueError(f"dataset lacks task features {sorted(missing)}")
    return self._convert_features(ds, task_feature_lengths)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    length = task_feature_lengths["targets"]
    lengths = {k: length for k in (*_TOKEN_FEATURES, "segment_ids", "position_ids")}
    return dict(lengths, pixel_values=task_feature_lengths["images"])

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    length, max_images = task_feature_lengths["targets"], task_feature_lengths["images"]
    image_shape = ds.element_spec["images"].shape[1:]
    if not image_shape.is_fully_defined():
      raise ValueError(f"images need a static [3, S, S] shape, got {image_shape}")
    image_shape = image_shape.as_list()

    def shift(x):
      tokens = x["targets"]
      n, k = tf.size(tokens) - 1, tf.shape(x["images"])[0]
      check = tf.debugging.Assert(
          (n <= length) & (k <= max_images),
          ["sequence longer than the row (run preprocessors.trim):", n, k])
      with tf.control_dependencies([check]):
        return dict(input_ids=tokens[:-1], targets=tokens[1:],
                    loss_weights=tf.cast(x["loss_weights"][1:], tf.float32),
                    image_embeds_position_mask=x["image_mask"][:-1], images=x["images"],
                    flush=tf.constant(False))

    ds = ds.map(shift, num_parallel_calls=tf.data.AUTOTUNE)
    empty_row = dict(
        {k: tf.zeros([length], tf.float32 if k == "loss_weights" else tf.int32) for k in _TOKEN_FEATURES},
        segment_ids=tf.zeros([length], tf.int32), position_ids=tf.zeros([length], tf.int32),
        pixel_values=tf.zeros([max_images, *image_shape]), fill=tf.constant(0),
        num_images=tf.constant(0), num_segments=tf.constant(0))

    def append(row, x):
      n, k = tf.size(x["input_ids"]), tf.shape(x["images"])[0]
      at = [[row["fill"], length - row["fill"] - n]]
      out = {key: row[key] + tf.pad(x[key], at) for key in _TOKEN_FEATURES}
      out["segment_ids"] = row["segment_ids"] + tf.pad(tf.fill([n], row["num_segments"] + 1), at)
      out["position_ids"] = row["position_ids"] + tf.pad(tf.range(n) + self._pad_id + 1, at)
      image_at = [[row["num_images"], max_images - row["num_images"] - k]] + [[0, 0]] * 3
      out["pixel_values"] = row["pixel_values"] + tf.pad(x["images"], image_at)
      out.update(fill=row["fill"] + n, num_images=row["num_images"] + k,
                 num_segments=row["num_segments"] + tf.minimum(n, 1))
      return out

    def step(row, x):
      fits = ((row["fill"] + tf.size(x["input_ids"]) <= length)
              & (row["num_images"] + tf.shape(x["images"])[0] <= max_images))
      if self.pack:
        fits &= ~x["flush"]
      else:
        fits &= tf.equal(row["fill"], 0)
      emit = ~fits & (row["fill"] > 0)
      start = tf.nest.map_structure(lambda a, b: tf.where(fits, a, b), row, empty_row)
      return append(start, x), (emit, row)

    # A last empty sequence flushes the row that is still open.
    flush = dict(input_ids=tf.zeros([0], tf.int32), targets=tf.zeros([0], tf.int32),
                 loss_weights=tf.zeros([0], tf.float32),
                 image_embeds_position_mask=tf.zeros([0], tf.int32),
                 images=tf.zeros([0, *image_shape]), flush=tf.constant(True))
    ds = ds.concatenate(tf.data.Dataset.from_tensors(flush))
    ds = ds.scan(empty_row, step).filter(lambda emit, row: emit)

    def finish(emit, row):
      del emit
      real = row["segment_ids"] > 0
      out = {k: row[k] for k in ("targets", "loss_weights", "image_embeds_position_mask",
                                 "pixel_values", "segment_ids")}
      out["input_ids"] = tf.where(real, row["input_ids"], self._pad_id)
      out["targets"] = tf.where(real, row["targets"], self._pad_id)
      out["position_ids"] = tf.where(real, row["position_ids"], self._pad_id)
      return out

    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
