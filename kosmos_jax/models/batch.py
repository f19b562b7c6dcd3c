"""The packed training batch: each feature's name, dtype and shape, written once.

The feature converter (data/feature_converter.py) writes batches in this
layout, the train step reads it, `kosmos-jax aot` compiles for it and the
tests build it. One row each (a batch adds a leading axis):

  input_ids                   int32 [L]   tokens[:-1] of each packed sequence, pad 1 after
  targets                     int32 [L]   tokens[1:]: the token each position predicts
  loss_weights                float32 [L] weights of the predicted tokens, 0 on padding
  segment_ids                 int32 [L]   1, 2, ... per packed sequence, 0 = padding
  position_ids                int32 [L]   per sequence 2, 3, ... (fairseq: pad_id + 1
                                          onwards, as decoder.positions_from_ids); pads 1
  image_embeds_position_mask  int32 [L]   1 on image slots, 2 on modality slots
  pixel_values                float32 [N, C, S, S]  the row's images in slot order,
                                          zero images after them (never referenced)
  modality_embeds             float32 [M, D]  only in rows of a model with
                                          `modalities`: the row's other-modality
                                          vectors (PandaGPT soft tokens) in slot
                                          order, zero-padded to D = the widest
                                          modality; zero rows after them
  modality_types              int32 [M]   each vector's modality (its index in
                                          sorted(model.modalities)), -1 after them

Plain Python and numpy: the train step imports it on machines without TensorFlow.
"""

import numpy as np

# Per-token features, [L] per row, and their dtypes.
TOKEN_FEATURES = {
  "input_ids": np.int32,
  "targets": np.int32,
  "loss_weights": np.float32,
  "segment_ids": np.int32,
  "position_ids": np.int32,
  "image_embeds_position_mask": np.int32,
}
# Per-image features, [N, C, S, S] per row.
IMAGE_FEATURES = {"pixel_values": np.float32}
# Per-row modality features: modality_embeds [M, D], modality_types [M].
MODALITY_FEATURES = {"modality_embeds": np.float32, "modality_types": np.int32}
FEATURES = {**TOKEN_FEATURES, **IMAGE_FEATURES, **MODALITY_FEATURES}
# What the model reads (keyword arguments of Kosmos2.__call__); the rest is for the loss.
MODEL_INPUTS = (
  "input_ids",
  "segment_ids",
  "position_ids",
  "image_embeds_position_mask",
  "pixel_values",
  "modality_embeds",
  "modality_types",
)
# Filled by packing (seqio's "packing features"): 0 segment = padding.
PACKING_FEATURES = ("segment_ids", "position_ids")


def shapes(
  batch_size: int,
  seq_len: int,
  images_per_row: int,
  image_size: int,
  num_channels: int = 3,
  modalities_per_row: int = 0,
  modality_dim: int = 0,
) -> dict[str, tuple[tuple[int, ...], type]]:
  """name -> (shape, dtype) of a batch; no pixel_values when rows carry no
  images, no modality features when they carry no modality vectors."""
  out = {k: ((batch_size, seq_len), dtype) for k, dtype in TOKEN_FEATURES.items()}
  if images_per_row:
    image = (batch_size, images_per_row, num_channels, image_size, image_size)
    out.update({k: (image, dtype) for k, dtype in IMAGE_FEATURES.items()})
  if modalities_per_row:
    out["modality_embeds"] = ((batch_size, modalities_per_row, modality_dim), np.float32)
    out["modality_types"] = ((batch_size, modalities_per_row), np.int32)
  return out
