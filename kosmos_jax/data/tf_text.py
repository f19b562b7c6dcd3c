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
from kosmos_jax.processing import vocab as vocab_lib

# A sequence is a triple of aligned int32 vectors.
Parts = tuple[tf.Tensor, tf.Tensor, tf.Tensor]  # (ids, loss weights, image-slot mask)


def repair_utf8(text: tf.Tensor):
  """(text with invalid UTF-8 replaced by U+FFFD, `_issues`)."""
  fixed = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")
  return fixed, quality.issue("text_invalid_utf8", tf.not_equal(fixed, text))


def is_blank(text: tf.Tensor) -> tf.Tensor:
  return tf.equal(tf.strings.length(tf.strings.strip(text)), 0)


def select(mask: tf.Tensor, *tensors: tf.Tensor) -> tuple[tf.Tensor, ...]:
  """The rows of each tensor where `mask` [n] is true (tf.boolean_mask costs
  many more ops, and ops cost start-up time)."""
  index = tf.reshape(tf.where(mask), [-1])
  return tuple(tf.gather(t, index) for t in tensors)


def rows_of(splits: tf.Tensor) -> tf.Tensor:
  """Each value's row (int32) from ragged row splits (RaggedTensor.value_rowids
  takes dozens of ops)."""
  splits = tf.cast(splits, tf.int32)
  return tf.searchsorted(splits[1:], tf.range(splits[-1]), side="right")


def _counts(rows: tf.Tensor, num_records) -> tf.Tensor:
  return tf.math.unsorted_segment_sum(tf.ones_like(rows), rows, num_records)


def clean_spans(raw: tf.Tensor, rows: tf.Tensor, text_length: tf.Tensor, score_threshold: float):
  """GrIT rows [n, 7] (start, end, x1, y1, x2, y2, score) of a batch of records
  (`rows` [n]: each row's record, ascending; `text_length` [b]: each record's
  length in characters) -> kept spans.

  Returns (spans int32 [k, 2], boxes float32 [k, 4], their records [k],
  `_issues` [b, len(REASONS)]), by the rules of quality.REASONS: non-finite
  rows, low scores, bad character ranges and empty boxes are removed; inverted
  boxes are swapped, boxes outside [0, 1] clipped.
  """
  raw = tf.reshape(tf.cast(raw, tf.float32), [-1, 7])
  finite = tf.reduce_all(tf.math.is_finite(raw), axis=1)
  raw = tf.where(finite[:, None], raw, 0.0)
  start, end, score = raw[:, 0], raw[:, 1], raw[:, 6]
  low = finite & (score < score_threshold)
  length = tf.gather(tf.cast(text_length, tf.float32), rows)
  in_range = (
    (start == tf.floor(start))
    & (end == tf.floor(end))
    & (start >= 0)
    & (end <= length)
    & (start < end)
  )
  candidate = finite & ~low
  bad_range = candidate & ~in_range
  candidate &= in_range
  x1, y1, x2, y2 = tf.unstack(raw[:, 2:6], axis=1)
  inverted = candidate & ((x1 > x2) | (y1 > y2))
  boxes = tf.stack(
    [tf.minimum(x1, x2), tf.minimum(y1, y2), tf.maximum(x1, x2), tf.maximum(y1, y2)], 1
  )
  outside = candidate & tf.reduce_any((boxes < 0) | (boxes > 1), axis=1)
  boxes = tf.clip_by_value(boxes, 0.0, 1.0)
  empty = candidate & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
  keep = candidate & ~empty
  count = lambda m: tf.math.unsorted_segment_sum(tf.cast(m, tf.int32), rows, tf.size(text_length))
  issues = (
    quality.issue("box_nan", count(~finite))
    + quality.issue("box_low_score", count(low))
    + quality.issue("span_out_of_range", count(bad_range))
    + quality.issue("box_inverted", count(inverted))
    + quality.issue("box_outside", count(outside))
    + quality.issue("box_empty", count(empty))
  )
  spans, boxes, rows = select(keep, tf.cast(raw[:, :2], tf.int32), boxes, rows)
  return spans, boxes, rows, issues


def select_spans(spans: tf.Tensor, boxes: tf.Tensor, rows: tf.Tensor, num_records):
  """Per record: sorts spans, merges identical ones, removes those overlapping
  a kept one. Takes `clean_spans` output (spans, boxes, records).

  Returns (phrase spans int32 [g, 2], their records [g], boxes [m, 4], each
  box's phrase index [m], `_issues` [b, len(REASONS)]), in record order.
  """
  key = tf.cast(spans[:, 0], tf.int64) * (2**31) + tf.cast(spans[:, 1], tf.int64)
  # By record, then by key; stable, so equal spans keep their input order.
  by_key = tf.argsort(key, stable=True)
  order = tf.gather(by_key, tf.argsort(tf.gather(rows, by_key), stable=True))
  spans, boxes, key, rows = (tf.gather(t, order) for t in (spans, boxes, key, rows))
  new = tf.concat(
    [
      tf.ones([tf.minimum(tf.size(key), 1)], tf.bool),
      (key[1:] != key[:-1]) | (rows[1:] != rows[:-1]),
    ],
    0,
  )
  group = tf.cumsum(tf.cast(new, tf.int32)) - 1
  starts, group_rows = select(new, spans, rows)
  # Phrases laid out as [record, position] for one greedy pass over positions;
  # the padding (0, 0) after a record's phrases changes nothing, and the
  # extra column gives tf.scan at least one step.
  position = tf.range(tf.size(group_rows)) - tf.gather(
    tf.cumsum(_counts(group_rows, num_records), exclusive=True), group_rows
  )
  at = tf.stack([group_rows, position], 1)
  columns = tf.reduce_max(tf.concat([[0], position], 0)) + 2
  dense = tf.scatter_nd(at, starts, tf.stack([num_records, columns, 2]))

  def step(carry, span):  # greedy: keep a phrase that starts after the last kept end
    keep = span[:, 0] >= carry[0]
    return tf.where(keep, span[:, 1], carry[0]), keep

  _, keep = tf.scan(
    step,
    tf.transpose(dense, [1, 0, 2]),
    initializer=(tf.zeros([num_records], tf.int32), tf.zeros([num_records], tf.bool)),
  )
  keep = tf.gather_nd(tf.transpose(keep), at)
  box_keep = tf.gather(keep, group)
  rank = tf.cumsum(tf.cast(keep, tf.int32)) - 1
  issues = quality.issue(
    "span_overlap", tf.math.unsorted_segment_sum(tf.cast(~box_keep, tf.int32), rows, num_records)
  )
  return (
    *select(keep, starts, group_rows),
    *select(box_keep, boxes, tf.gather(rank, group)),
    issues,
  )


def quantize_boxes(boxes: tf.Tensor, num_patches_per_side: int, quantizer: str = "hf") -> tf.Tensor:
  """`grounding.box_to_patch_indices` on [n, 4] boxes -> int32 [n, 2] (ul, lr)."""
  p = num_patches_per_side
  b = tf.cast(boxes, tf.float64)
  if quantizer == "hf":
    ul, lr = tf.floor(b[:, :2] * p), tf.math.ceil(b[:, 2:] * p - 1)
  elif quantizer == "original":
    cell = tf.constant(1 / p, tf.float64)
    ul, lr = (
      tf.floor(tf.maximum(b[:, :2], 0) / cell),
      tf.floor(tf.minimum(b[:, 2:], 0.99999) / cell),
    )
  else:
    raise ValueError(f"quantizer must be 'hf' or 'original', got {quantizer!r}")
  ul, lr = tf.cast(ul, tf.int32), tf.cast(lr, tf.int32)
  return tf.stack([ul[:, 1] * p + ul[:, 0], lr[:, 1] * p + lr[:, 0]], 1)


def _ranges(starts: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
  """start, start + 1, .. for each (start, length), concatenated (one op;
  tf.ragged.range adds dozens)."""
  return tf.raw_ops.RaggedRange(starts=starts, limits=starts + lengths, deltas=1)[1]


_SLOTS = 2**40  # order keys per record; the last is the tail's, after any phrase's


def grounded_caption_ids(
  vocab,
  caption: tf.Tensor,
  grounded: tf.Tensor,
  phrases: tf.Tensor,
  phrase_rows: tf.Tensor,
  boxes: tf.Tensor,
  box_phrase: tf.Tensor,
  prefix=(),
  quantizer: str = "hf",
) -> tf.RaggedTensor:
  """Ids per record (ragged [b, None]) for captions [b] and their
  `select_spans` output: where `grounded`, `prefix` and the ids of
  `render_grounded_text(caption, ...)`; else the caption's plain ids."""
  b, g, m = tf.size(caption), tf.size(phrase_rows), tf.size(box_phrase)
  starts, ends = phrases[:, 0], phrases[:, 1]
  # A phrase's text starts where its record's previous phrase ended.
  first = tf.concat([[True], phrase_rows[1:] != phrase_rows[:-1]], 0)[:g]
  pos = tf.where(first, 0, tf.concat([[0], ends[:-1]], 0)[:g])
  text = tf.gather(caption, phrase_rows)
  before = tf.strings.regex_replace(
    tf.strings.substr(text, pos, starts - pos, unit="UTF8_CHAR"), " +$", ""
  )
  lead = pos + tf.strings.length(before, unit="UTF8_CHAR")
  phrase = tf.strings.substr(text, lead, ends - lead, unit="UTF8_CHAR")
  last = tf.maximum(tf.math.unsorted_segment_max(ends, phrase_rows, b), 0)
  tail = tf.strings.substr(
    caption, last, tf.strings.length(caption, unit="UTF8_CHAR") - last, unit="UTF8_CHAR"
  )
  tokens = vocab.encode_plain_tf(tf.concat([before, phrase, tail, caption], 0))
  # Each box as `</delimiter_of_multi_objects/> ul lr`; a phrase's first box skips the delimiter.
  pairs = quantize_boxes(boxes, vocab.num_patches_per_side, quantizer) + vocab.patch_index_id(0)
  box_ids = tf.concat([tf.fill([m, 1], vocab.tag_id("</delimiter_of_multi_objects/>")), pairs], 1)
  tags = [vocab.tag_id(t) for t in ("<phrase>", "</phrase>", "<object>", "</object>")] + list(
    prefix
  )
  values = tf.concat([tags, tf.reshape(box_ids, [-1]), tokens.flat_values], 0)
  token_start = len(tags) + 3 * m + tf.cast(tokens.row_starts(), tf.int32)
  token_length = tf.cast(tokens.row_lengths(), tf.int32)
  tokens_at = lambda at, n: (
    token_start[at : at + n],
    token_length[at : at + n],
  )  # before, phrase, tail, caption
  first_box = tf.concat([[True], box_phrase[1:] != box_phrase[:-1]], 0)[:m]
  box_rows = tf.gather(phrase_rows, box_phrase)
  on = lambda rows: tf.cast(tf.gather(grounded, rows), tf.int32)[
    :, None
  ]  # phrases count where grounded
  # The ids are pieces (start, length) of `values`, put in order by a key:
  # (record, slot: 0 its head, 1 + i phrase i, _SLOTS - 1 its tail; piece in the slot).
  key = lambda rows, slot, piece: (tf.cast(rows, tf.int64)[:, None] * _SLOTS + slot) * 8 + piece
  ones = tf.ones([g], tf.int32)
  # Per phrase: the text before it, <phrase>, the phrase, </phrase>, <object>, (its boxes,)
  # </object>.
  (before_start, before_length), (phrase_start, phrase_length) = tokens_at(0, g), tokens_at(g, g)
  phrase_pieces = (
    key(phrase_rows, tf.range(1, g + 1, dtype=tf.int64)[:, None], [0, 1, 2, 3, 4, 6]),
    tf.stack([before_start, 0 * ones, phrase_start, ones, 2 * ones, 3 * ones], 1),
    tf.stack([before_length, ones, phrase_length, ones, ones, ones], 1) * on(phrase_rows),
    phrase_rows,
  )
  box_pieces = (
    key(box_rows, tf.cast(box_phrase, tf.int64)[:, None] + 1, [5]),
    (len(tags) + 3 * tf.range(m) + tf.cast(first_box, tf.int32))[:, None],
    tf.where(first_box, 2, 3)[:, None] * on(box_rows),
    box_rows,
  )
  # Per record: the prefix and the tail where grounded, else the plain caption.
  (tail_start, tail_length), (caption_start, caption_length) = (
    tokens_at(2 * g, b),
    tokens_at(2 * g + b, b),
  )
  record_pieces = (
    key(tf.range(b), [0, 0, _SLOTS - 1], [0, 1, 0]),
    tf.stack([tf.fill([b], 4), caption_start, tail_start], 1),
    tf.stack([tf.fill([b], len(prefix)), caption_length, tail_length], 1)
    * tf.cast(tf.stack([grounded, ~grounded, grounded], 1), tf.int32),
    tf.range(b),
  )
  flat = lambda t: tf.reshape(t, [-1])
  key, start, length, record = (
    tf.concat(t, 0)
    for t in zip(
      *(
        (flat(k), flat(s), flat(n), flat(tf.broadcast_to(r[:, None], tf.shape(n))))
        for k, s, n, r in (phrase_pieces, box_pieces, record_pieces)
      )
    )
  )
  row_lengths = tf.math.unsorted_segment_sum(length, record, b)
  order = tf.argsort(key, stable=True)  # a phrase's boxes share a key and keep their order
  start, length = tf.gather(start, order), tf.gather(length, order)
  ids = tf.gather(values, _ranges(start, length))
  return tf.RaggedTensor.from_row_lengths(ids, row_lengths, validate=False)


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
  return (
    tf.constant(ids, tf.int32),
    tf.constant([0] * (n + 1) + [1], tf.int32),
    tf.constant([0] + [1] * n + [0], tf.int32),
  )


def join(*parts: Parts) -> dict:
  """Concatenates parts into `targets`, `loss_weights`, `image_mask`."""
  ids, weights, mask = (tf.concat(list(p), 0) for p in zip(*parts))
  return dict(targets=ids, loss_weights=weights, image_mask=mask)


def join_rows(before: list[Parts], text: tf.RaggedTensor, after: list[Parts]) -> dict:
  """`join(*before, text_part(row), *after)` for each row of `text` (ids,
  ragged [b, None]), as ragged features [b, None]."""
  head, tail = (tuple(tf.concat(list(p), 0) for p in zip(*parts)) for parts in (before, after))
  h, t = tf.size(head[0]), tf.size(tail[0])
  n = tf.cast(text.row_lengths(), tf.int32)
  lengths = h + n + t
  # Every position of a row picks from [head, tail, all text ids].
  offset = _ranges(tf.zeros_like(lengths), lengths)
  row = rows_of(tf.concat([[0], tf.cumsum(lengths)], 0))
  n, text_start = tf.gather(n, row), tf.gather(tf.cast(text.row_starts(), tf.int32), row)
  index = tf.where(
    offset < h, offset, tf.where(offset < h + n, h + t + text_start + offset - h, offset - n)
  )
  ids = tf.cast(text.flat_values, tf.int32)
  sources = (ids, tf.ones_like(ids), tf.zeros_like(ids))
  features = (
    tf.RaggedTensor.from_row_lengths(
      tf.gather(tf.concat([a, b, c], 0), index), lengths, validate=False
    )
    for a, b, c in zip(head, tail, sources)
  )
  return dict(zip(("targets", "loss_weights", "image_mask"), features))


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
