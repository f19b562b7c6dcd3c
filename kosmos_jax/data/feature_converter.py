"""Multimodal decoder-only feature converter: shift, pack, pad.

Task features (preprocessors.py): `targets` (`<s> ... </s>`), `loss_weights`,
`image_mask`, `images` [k, 3, S, S], and for a model with modalities
`modality_embeds` [m, D] and `modality_types` [m] (conversation_tasks.py).
Task feature lengths: `targets` = L tokens per row, `images` = N images per
row, and with modalities `modalities` = M vectors per row.

Model features: the packed training batch, one row each, as
kosmos_jax/models/batch.py lays it out (names, dtypes, shapes, meaning).
Packing is greedy and in order: a sequence goes into the current row if its
tokens, images and modality vectors fit, else the row is emitted and a new one
starts. The model keeps packed sequences apart through `segment_ids`
(attention) and `position_ids`; images and vectors never cross rows.
"""

from collections.abc import Mapping

import seqio
import tensorflow as tf

from kosmos_jax.models import batch as batch_lib
from kosmos_jax.processing import vocab as vocab_lib

_Spec = seqio.FeatureConverter.FeatureSpec
# Per-token features that a sequence brings (packing adds segment and position ids).
_TOKEN_FEATURES = tuple(k for k in batch_lib.TOKEN_FEATURES if k not in batch_lib.PACKING_FEATURES)


def _no_vectors(keys, width: int) -> dict:
  """Empty modality features (of the keys asked for)."""
  empty = dict(
    modality_embeds=tf.zeros([0, width], tf.float32), modality_types=tf.zeros([0], tf.int32)
  )
  return {k: empty[k] for k in keys}


class MultimodalFeatureConverter(seqio.FeatureConverter):
  """See the module doc. `pack=False` gives one sequence per row (segment id 1)."""

  TASK_FEATURES = {
    "targets": _Spec(tf.int32),
    "loss_weights": _Spec(tf.int32),
    "image_mask": _Spec(tf.int32),
    "images": _Spec(tf.float32, rank=4),
  }
  MODALITY_TASK_FEATURES = {
    "modality_embeds": _Spec(tf.float32, rank=2),
    "modality_types": _Spec(tf.int32),
  }
  MODEL_FEATURES = {
    k: _Spec(
      tf.as_dtype(dtype),
      rank=4 if k in batch_lib.IMAGE_FEATURES else 2 if k == "modality_embeds" else 1,
    )
    for k, dtype in batch_lib.FEATURES.items()
    if k not in batch_lib.PACKING_FEATURES
  }
  PACKING_FEATURE_DTYPES = {
    k: tf.as_dtype(batch_lib.FEATURES[k]) for k in batch_lib.PACKING_FEATURES
  }

  def __init__(self, pack: bool = True, pad_id: int = vocab_lib.PAD_ID):
    super().__init__(pack=pack, apply_length_check=False)
    self._pad_id = pad_id

  def __call__(
    self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    # seqio's checks assume rank-1 packable features; images are rank 4.
    keys = set(task_feature_lengths) - {"modalities"}
    if keys != {"targets", "images"}:
      raise ValueError(
        f"task_feature_lengths needs 'targets' (tokens per row) and 'images' (images "
        f"per row), and may have 'modalities', got {dict(task_feature_lengths)}"
      )
    needed = set(self.TASK_FEATURES)
    if "modalities" in task_feature_lengths:
      needed |= set(self.MODALITY_TASK_FEATURES)
    elif set(self.MODALITY_TASK_FEATURES) & set(ds.element_spec):
      # Their slots would read vectors that no row carries.
      raise ValueError("the dataset has modality vectors: give task feature length 'modalities'")
    missing = needed - set(ds.element_spec)
    if missing:
      raise ValueError(f"dataset lacks task features {sorted(missing)}")
    return self._convert_features(ds, task_feature_lengths)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    length = task_feature_lengths["targets"]
    lengths = {k: length for k in batch_lib.TOKEN_FEATURES}
    lengths["pixel_values"] = task_feature_lengths["images"]
    if "modalities" in task_feature_lengths:
      lengths.update({k: task_feature_lengths["modalities"] for k in batch_lib.MODALITY_FEATURES})
    return lengths

  def _convert_features(
    self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    length, max_images = task_feature_lengths["targets"], task_feature_lengths["images"]
    image_shape = ds.element_spec["images"].shape[1:]
    if not image_shape.is_fully_defined():
      raise ValueError(f"images need a static [3, S, S] shape, got {image_shape}")
    image_shape = image_shape.as_list()
    max_vectors = task_feature_lengths.get("modalities")
    with_vectors = max_vectors is not None
    width = ds.element_spec["modality_embeds"].shape[-1] if with_vectors else 0
    if with_vectors and width is None:
      raise ValueError("modality_embeds need a static [m, D] shape")
    vector_keys = tuple(batch_lib.MODALITY_FEATURES) if with_vectors else ()

    @tf.autograph.experimental.do_not_convert
    def shift(x):
      tokens = x["targets"]
      n, k = tf.size(tokens) - 1, tf.shape(x["images"])[0]
      m = tf.size(x["modality_types"]) if with_vectors else 0
      fits = (n <= length) & (k <= max_images) & (m <= (max_vectors if with_vectors else 0))
      check = tf.debugging.Assert(
        fits, ["sequence longer than the row (run preprocessors.trim):", n, k, m]
      )
      with tf.control_dependencies([check]):
        return dict(
          input_ids=tokens[:-1],
          targets=tokens[1:],
          loss_weights=tf.cast(x["loss_weights"][1:], tf.float32),
          image_embeds_position_mask=x["image_mask"][:-1],
          images=x["images"],
          flush=tf.constant(False),
          **{k: x[k] for k in vector_keys},
        )

    ds = ds.map(shift, num_parallel_calls=tf.data.AUTOTUNE)
    # The open row grows by concatenation, and its images are a list of
    # references: appending costs the sequence's own tokens, and each image is
    # copied once, into the finished row (images are the bulk of a row).
    image_list_shape = tf.constant([-1, *image_shape], tf.int32)
    empty_row = dict(
      {
        k: tf.zeros([0], tf.float32 if k == "loss_weights" else tf.int32)
        for k in batch_lib.TOKEN_FEATURES
      },
      images=tf.raw_ops.EmptyTensorList(
        element_shape=image_list_shape, max_num_elements=-1, element_dtype=tf.float32
      ),
      num_images=tf.constant(0),
      num_segments=tf.constant(0),
      **_no_vectors(vector_keys, width),
    )

    @tf.autograph.experimental.do_not_convert
    def step(row, x):
      fill, num_images = tf.size(row["input_ids"]), row["num_images"]
      n, k = tf.size(x["input_ids"]), tf.shape(x["images"])[0]
      fits = (fill + n <= length) & (num_images + k <= max_images)
      if with_vectors:
        fits &= tf.size(row["modality_types"]) + tf.size(x["modality_types"]) <= max_vectors
      if self.pack:
        fits &= ~x["flush"]
      else:
        fits &= tf.equal(fill, 0)
      emit = ~fits & (fill > 0)
      # The row x goes into: the open one, or (cut to nothing) a new one.
      keep_tokens = tf.where(fits, fill, 0)
      segment = tf.where(fits, row["num_segments"], 0) + 1
      out = {key: tf.concat([row[key][:keep_tokens], x[key]], 0) for key in _TOKEN_FEATURES}
      out["segment_ids"] = tf.concat([row["segment_ids"][:keep_tokens], tf.fill([n], segment)], 0)
      out["position_ids"] = tf.concat(
        [row["position_ids"][:keep_tokens], tf.range(n) + self._pad_id + 1], 0
      )
      kept_images = tf.where(fits, tf.raw_ops.TensorListLength(input_handle=row["images"]), 0)
      images = tf.raw_ops.TensorListResize(input_handle=row["images"], size=kept_images)
      out["images"] = tf.raw_ops.TensorListPushBack(input_handle=images, tensor=x["images"])
      out["num_images"] = tf.where(fits, num_images, 0) + k
      out["num_segments"] = segment - 1 + tf.minimum(n, 1)
      # Vectors are small: the row's grow by concatenation, like its tokens.
      if with_vectors:
        kept_vectors = tf.where(fits, tf.size(row["modality_types"]), 0)
        out.update({k: tf.concat([row[k][:kept_vectors], x[k]], 0) for k in vector_keys})
      return out, (emit, row)

    # A last empty sequence flushes the row that is still open.
    flush = dict(
      input_ids=tf.zeros([0], tf.int32),
      targets=tf.zeros([0], tf.int32),
      loss_weights=tf.zeros([0], tf.float32),
      image_embeds_position_mask=tf.zeros([0], tf.int32),
      images=tf.zeros([0, *image_shape]),
      flush=tf.constant(True),
      **_no_vectors(vector_keys, width),
    )
    ds = ds.concatenate(tf.data.Dataset.from_tensors(flush))
    ds = ds.scan(empty_row, step).filter(
      tf.autograph.experimental.do_not_convert(lambda emit, row: emit)
    )

    zero_images = tf.zeros([max_images, *image_shape])

    @tf.autograph.experimental.do_not_convert
    def finish(emit, row):
      del emit
      fill = tf.size(row["input_ids"])
      pad = lambda key, value: tf.ensure_shape(
        tf.pad(row[key], [[0, length - fill]], constant_values=value), [length]
      )
      out = {k: pad(k, 0) for k in ("loss_weights", "image_embeds_position_mask", "segment_ids")}
      out.update({k: pad(k, self._pad_id) for k in ("input_ids", "targets", "position_ids")})
      images = tf.raw_ops.TensorListPushBack(
        input_handle=row["images"], tensor=zero_images[: max_images - row["num_images"]]
      )
      pixels, _ = tf.raw_ops.TensorListConcatV2(
        input_handle=images,
        element_shape=image_list_shape,
        leading_dims=tf.zeros([0], tf.int64),
        element_dtype=tf.float32,
      )
      out["pixel_values"] = tf.ensure_shape(pixels, [max_images, *image_shape])
      if with_vectors:
        # Zero vectors of type -1 after the row's own: no slot reads them.
        spare = max_vectors - tf.size(row["modality_types"])
        out["modality_embeds"] = tf.ensure_shape(
          tf.pad(row["modality_embeds"], [[0, spare], [0, 0]]), [max_vectors, width]
        )
        out["modality_types"] = tf.ensure_shape(
          tf.pad(row["modality_types"], [[0, spare]], constant_values=-1), [max_vectors]
        )
      return out

    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
