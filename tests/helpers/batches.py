"""Synthetic batches, in numpy alone (no torch): packed rows in the feature
converter's layout for train-step tests, and HF-style grounded rows."""

import numpy as np

from kosmos_jax.models import batch as batch_lib


def packed_batch(config, seed: int = 0, batch_size: int | None = None) -> dict:
  """Rows of two packed sequences, `<s> <image> slots </image> text </s>` then
  `<s> text </s>`, shifted into input_ids/targets as the converter does."""
  rng = np.random.default_rng(seed)
  b = batch_size or config.batch_size
  m = config.model
  latents, vocab = m.latent_query_num, m.text.vocab_size
  v = m.vision
  shapes = batch_lib.shapes(b, config.seq_len, config.images_per_row, v.image_size, v.num_channels)
  rows = {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
  rows["input_ids"][:], rows["position_ids"][:] = 1, 1
  for r in range(b):
    image = [0, vocab - 3, *range(4, 4 + latents), vocab - 2]
    first = image + [*rng.integers(100, vocab - 3, rng.integers(3, 8)), 2]
    second = [0, *rng.integers(100, vocab - 3, rng.integers(2, 6)), 2]
    at = 0
    for s, tokens in enumerate((first, second), start=1):
      n = len(tokens) - 1
      sl = slice(at, at + n)
      rows["input_ids"][r, sl], rows["targets"][r, sl] = tokens[:-1], tokens[1:]
      rows["segment_ids"][r, sl] = s
      rows["position_ids"][r, sl] = np.arange(n) + 2
      # Loss from </image> on (reference 1.10): not on <image> or the slots.
      first_loss = len(image) - 2 if s == 1 else 0
      rows["loss_weights"][r, at + first_loss : at + n] = 1.0
      at += n
    rows["image_embeds_position_mask"][r, 2 : 2 + latents] = 1
  if "pixel_values" in rows:
    rows["pixel_values"][:] = rng.standard_normal(rows["pixel_values"].shape)
  return rows


def grounded_rows(vocab_size: int, latents: int, image_size: int, lengths, seed: int = 0) -> dict:
  """Left-padded rows in transformers' Kosmos-2 input layout, as its processor
  lays them out: <s> <image> slots </image> and `lengths[i]` random text
  tokens, and a random picture each."""
  rng = np.random.default_rng(seed)
  rows, slot_rows = [], []
  for n_text in lengths:
    text = rng.integers(4 + latents, vocab_size - 3, size=n_text)
    ids = [0, vocab_size - 3, *range(4, 4 + latents), vocab_size - 2, *text]
    rows.append(ids)
    slot_rows.append([0, 0] + [1] * latents + [0] + [0] * n_text)
  width = max(map(len, rows))
  input_ids = np.full((len(rows), width), 1, np.int64)
  attention_mask = np.zeros_like(input_ids)
  slot_mask = np.zeros_like(input_ids)
  for i, (ids, slots) in enumerate(zip(rows, slot_rows)):
    input_ids[i, width - len(ids) :] = ids
    attention_mask[i, width - len(ids) :] = 1
    slot_mask[i, width - len(ids) :] = slots
  pixel_values = rng.standard_normal((len(rows), 3, image_size, image_size)).astype(np.float32)
  return dict(
    input_ids=input_ids,
    attention_mask=attention_mask,
    image_embeds_position_mask=slot_mask,
    pixel_values=pixel_values,
  )
