"""Text and grounding ops in TensorFlow: tokenizing data text, cleaning GrIT spans,
rendering grounded captions to ids, and assembling token sequences.

Grounded rendering reproduces `grounding.render_grounded_text` followed by
`KosmosVocabulary.encode` (the tests check equality): spans are sorted by start,
identical spans are merged into one phrase with several boxes
(`</delimiter_of_multi_objects/>`), a span overlapping an earlier kept one is
removed, and spaces right before a phrase move inside `<phrase>`.
Boxes are quantized with grounding.py's formulas ("hf" or "original").

Data text is tokenized as text: a literal "<image>" or "</s>" in a web caption
becomes ordinary pieces, never a tag or special id (the original fairseq
pipeline also encoded captions with sentencepiece only).
"""
import tensorflow as tf

from kosmos_jax.data import quality
from kosmos_jax.data import vocab as vocab_lib

# A sequence is a triple of aligned int32 vectors.
Parts = tuple[tf.Tensor, tf.Tensor, tf.Tensor]  # (ids, loss weights, image-slot mask)


def repair_utf8(text: tf.Tensor):
  """(text with invalid UTF-8 replaced by U+FFFD, `_issues`)."""
  fixed = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")
  return fixed, quality.issue("text_invalid_utf8", tf.not_equal(fixed, text))


def is_blank(text: tf.Tensor) -> tf.Tensor:
  return tf.equal(tf.strings.length(tf.strings.strip(text)), 0)


def clean_spans(raw: tf.Tensor, text_length: tf.Tensor, score_threshold: float):
  """GrIT rows [n, 7] (start, end, x1, y1, x2, y2, score) -> kept spans.

  Returns (spans int32 [k, 2], boxes float32 [k, 4], `_issues`), by the rules of
  quality.REASONS: non-finite rows, low scores, bad character ranges and empty
  boxes are removed; inverted boxes are swapped, boxes outside [0, 1] clipped.
  """
  raw = tf.reshape(tf.cast(raw, tf.float32), [-1, 7])
  finite = tf.reduce_all(tf.math.is_finite(raw), axis=1)
  raw = tf.where(finite[:, None], raw, 0.0)
  start, end, score = raw[:, 0], raw[:, 1], raw[:, 6]
  low = finite & (score < score_threshold)
  length = tf.cast(text_length, tf.float32)
  in_range = ((start == tf.floor(start)) & (end == tf.floor(end)) & (start >= 0)
              & (end <= length) & (start < end))
  candidate = finite & ~low
  bad_range = candidate & ~in_range
  candidate &= in_range
  x1, y1, x2, y2 = tf.unstack(raw[:, 2:6], axis=1)
  inverted = candidate & ((x1 > x2) | (y1 > y2))
  boxes = tf.stack([tf.minimum(x1, x2), tf.minimum(y1, y2), tf.maximum(x1, x2), tf.maximum(y1, y2)], 1)
  outside = candidate & tf.reduce_any((boxes < 0) | (boxes > 1), axis=1)
  boxes = tf.clip_by_value(boxes, 0.0, 1.0)
  empty = candidate & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
  keep = candidate & ~empty
  count = lambda m: tf.reduce_sum(tf.cast(m, tf.int32))
  issues = (quality.issue("box_nan", count(~finite)) + quality.issue("box_low_score", count(low))
            + quality.issue("span_out_of_range", count(bad_range))
            + quality.issue("box_inverted", count(inverted)) + quality.issue("box_outside", count(outside))
            + quality.issue("box_empty", count(empty)))
  spans = tf.cast(tf.boolean_mask(raw[:, :2], keep), tf.int32)
  return spans, tf.boolean_mask(boxes, keep), issues


def select_spans(spans: tf.Tensor, boxes: tf.Tensor):
  """Sorts spans, merges identical ones, removes those overlapping a kept one.

  Returns (phrase spans int32 [g, 2], boxes [b, 4], box -> phrase index [b],
  `_issues`).
  """
  key = tf.cast(spans[:, 0], tf.int64) * (2**31) + tf.cast(spans[:, 1], tf.int64)
  order = tf.argsort(key, stable=True)
  spans, boxes, key = tf.gather(spans, order), tf.gather(boxes, order), tf.gather(key, order)
  new = tf.concat([tf.ones([tf.minimum(tf.size(key), 1)], tf.bool), key[1:] != key[:-1]], 0)
  group = tf.cumsum(tf.cast(new, tf.int32)) - 1
  starts, ends = tf.boolean_mask(spans[:, 0], new), tf.boolean_mask(spans[:, 1], new)

  def step(carry, span):  # greedy: keep a phrase that starts after the last kept end
    last_end, _ = carry
    keep = span[0] >= last_end
    return tf.where(keep, span[1], last_end), keep

  _, keep = tf.scan(step, (starts, ends), initializer=(tf.constant(0), tf.constant(False)))
  box_keep = tf.gather(keep, group)
  rank = tf.cumsum(tf.cast(keep, tf.int32)) - 1
  phrases = tf.stack([tf.boolean_mask(starts, keep), tf.boolean_mask(ends, keep)], 1)
  issues = quality.issue("span_overlap", tf.reduce_sum(tf.cast(~box_keep, tf.int32)))
  return (phrases, tf.boolean_mask(boxes, box_keep),
          tf.boolean_mask(tf.gather(rank, group), box_keep), issues)


def quantize_boxes(boxes: tf.Tensor, num_patches_per_side: int, quantizer: str = "hf") -> tf.Tensor:
  """`grounding.box_to_patch_indices` on [n, 4] boxes -> int32 [n, 2] (ul, lr)."""
  p = num_patches_per_side
  b = tf.cast(boxes, tf.float64)
  if quantizer == "hf":
    ul, lr = tf.floor(b[:, :2] * p), tf.math.ceil(b[:, 2:] * p - 1)
  elif quantizer == "original":
    cell = tf.constant(1 / p, tf.float64)
    ul, lr = tf.floor(tf.maximum(b[:, :2], 0) / cell), tf.floor(tf.minimum(b[:, 2:], 0.99999) / cell)
  else:
    raise ValueError(f"quantizer must be 'hf' or 'original', got {quantizer!r}")
  ul, lr = tf.cast(ul, tf.int32), tf.cast(lr, tf.int32)
  return tf.stack([ul[:, 1] * p + ul[:, 0], lr[:, 1] * p + lr[:, 0]], 1)


def object_ids(vocab, boxes: tf.Tensor, box_phrase: tf.Tensor, num_phrases, quantizer: str = "hf"):
  """Ragged [g, ?]: `<object> ul lr [</delimiter_of_multi_objects/> ul lr].. </object>` per phrase."""
  pairs = quantize_boxes(boxes, vocab.num_patches_per_side, quantizer) + vocab.patch_index_id(0)
  first = tf.concat([[True], box_phrase[1:] != box_phrase[:-1]], 0)[:tf.size(box_phrase)]
  delim = tf.fill(tf.shape(box_phrase), vocab.tag_id("</delimiter_of_multi_objects/>"))
  # First box of a phrase: [ul, lr, -]; the others: [delimiter, ul, lr].
  rows = tf.where(first[:, None], tf.concat([pairs, pairs[:, :1]], 1),
                  tf.concat([delim[:, None], pairs], 1))
  per_box = tf.RaggedTensor.from_tensor(rows, lengths=tf.where(first, 2, 3), row_splits_dtype=tf.int32)
  locations = tf.RaggedTensor.from_value_rowids(per_box, box_phrase, nrows=num_phrases).merge_dims(1, 2)
  locations = locations.with_row_splits_dtype(tf.int64)
  column = lambda tag: tf.RaggedTensor.from_tensor(tf.fill([num_phrases, 1], vocab.tag_id(tag)))
  return tf.concat([column("<object>"), locations, column("</object>")], axis=1)


def grounded_caption_ids(vocab, caption: tf.Tensor, phrases: tf.Tensor, boxes: tf.Tensor,
                         box_phrase: tf.Tensor, quantizer: str = "hf") -> tf.Tensor:
  """Ids of `render_grounded_text(caption, ...)` for `select_spans` output."""
  g = tf.shape(phrases)[0]
  pos = tf.concat([[0], phrases[:-1, 1]], 0)[:g]
  text = tf.fill([g], caption)
  before = tf.strings.regex_replace(tf.strings.substr(text, pos, phrases[:, 0] - pos, unit="UTF8_CHAR"),
                                    " +$", "")
  lead = pos + tf.strings.length(before, unit="UTF8_CHAR")
  phrase = tf.strings.substr(text, lead, phrases[:, 1] - lead, unit="UTF8_CHAR")
  last = tf.reduce_max(tf.concat([[0], phrases[:, 1]], 0))
  tail = tf.strings.substr(caption, last, tf.strings.length(caption, unit="UTF8_CHAR") - last,
                           unit="UTF8_CHAR")
  pieces = vocab.encode_plain_tf(tf.concat([before, phrase, [tail]], 0))
  column = lambda tag: tf.RaggedTensor.from_tensor(tf.fill([g, 1], vocab.tag_id(tag)))
  rows = tf.concat([pieces[:g], column("<phrase>"), pieces[g:2 * g], column("</phrase>"),
                    object_ids(vocab, boxes, box_phrase, g, quantizer)], axis=1)
  return tf.concat([rows.flat_values, pieces[2 * g]], 0)


# --- sequences ---------------------------------------------------------------


def text_part(ids: tf.Tensor, weight: int = 1) -> Parts:
  ids = tf.cast(ids, tf.int32)
  return ids, tf.fill(tf.shape(ids), weight), tf.zeros_like(ids)


def token_part(*ids: int, weight: int = 1) -> Parts:
  return text_part(tf.constant(ids, tf.int32), weight)


def image_part(vocab, num_image_tokens: int) -> Parts:
  """`<image>` + slot ids + `</image>`: no loss on `<image>` and the slots, loss
  on `</image>` (reference 1.10), slots marked in the mask."""
  n = num_image_tokens
  ids = [vocab.tag_id("<image>"), *vocab_lib.image_slot_ids(n), vocab.tag_id("</image>")]
  return (tf.constant(ids, tf.int32), tf.constant([0] * (n + 1) + [1], tf.int32),
          tf.constant([0] + [1] * n + [0], tf.int32))


def join(*parts: Parts) -> dict:
  """Concatenates parts into `targets`, `loss_weights`, `image_mask`."""
  ids, weights, mask = (tf.concat(list(p), 0) for p in zip(*parts))
  return dict(targets=ids, loss_weights=weights, image_mask=mask)


def interleave(vocab, texts: tf.Tensor, is_image: tf.Tensor, num_image_tokens: int) -> Parts:
  """A document's items, in order: text items tokenized, image items as image parts."""
  n = tf.size(is_image)
  text_ids = vocab.encode_plain_tf(tf.where(is_image, "", texts))
  block = image_part(vocab, num_image_tokens)
  lengths = tf.where(is_image, tf.size(block[0]), 0)
  as_rows = lambda v: tf.RaggedTensor.from_tensor(tf.tile(v[None], [n, 1]), lengths=lengths)
  ids = tf.concat([as_rows(block[0]), text_ids], 1).flat_values
  weights = tf.concat([as_rows(block[1]), tf.ones_like(text_ids)], 1).flat_values
  mask = tf.concat([as_rows(block[2]), tf.zeros_like(text_ids)], 1).flat_values
  return ids, weights, mask
