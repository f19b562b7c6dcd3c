"""Bad-input accounting: per-reason counters, the drop filter and strict mode.

Every preprocessing op that meets bad input either repairs it by a fixed rule or
marks the record for dropping, and records why in two per-example features:

  `_issues`  int32 [len(REASONS)]: how often each reason occurred in the record
             (a document can hold several bad images, a caption several bad boxes);
  `_drop`    bool: the record must not reach the model.

`filter_and_count` (the last preprocessor of every task) adds `_issues` to a
`DataStats` object that the trainer reads, drops the marked records, and in
strict mode fails instead, naming the record's key.

Reasons and their rules (kind: "drop" = record dropped, "repair" = fixed and
kept, "filter" = ordinary filtering that strict mode accepts):
"""

import numpy as np
import tensorflow as tf

# name -> (kind, rule). The order fixes the index in `_issues`.
REASONS = {
  "image_missing": ("drop", "no image bytes (empty field or unreadable file)"),
  "image_unknown_format": ("drop", "not JPEG, PNG, GIF, WebP or BMP by its magic bytes"),
  "image_truncated": (
    "drop",
    "JPEG without EOI in its last 1 KiB, PNG without IEND, GIF without "
    "trailer, WebP shorter than its RIFF size",
  ),
  "image_zero_size": ("drop", "PNG/GIF header gives zero width or height"),
  "text_empty": ("drop", "caption or document text is empty after stripping whitespace"),
  "text_invalid_utf8": ("repair", "invalid UTF-8 bytes replaced by U+FFFD"),
  "box_nan": ("repair", "span with a NaN/inf start, end, coordinate or score removed"),
  "box_inverted": ("repair", "x1 > x2 or y1 > y2: coordinates swapped"),
  "box_outside": ("repair", "coordinates clipped to [0, 1]"),
  "box_empty": ("repair", "span whose box has no area (after clipping) removed"),
  "span_out_of_range": (
    "repair",
    "span with start < 0, end > caption length, start >= end or fractional offsets removed",
  ),
  "span_overlap": ("repair", "span overlapping an earlier one (by start) removed"),
  "doc_image_dropped": ("repair", "bad image inside a document removed with its slots"),
  "box_low_score": ("filter", "span below the box score threshold removed"),
  "box_cropped_out": ("filter", "less than 20% of the box survives the centre crop: removed"),
  "truncated": (
    "filter",
    "longer than the sequence length or image budget: cut before the "
    "first image that does not fit whole, then at the token limit",
  ),
  "too_short": ("drop", "fewer than 2 tokens left (nothing to predict)"),
  # Instruction records (data/instructions.py has the formats).
  "instruction_bad_json": ("drop", "instruction line that is not a JSON object"),
  "instruction_field_missing": (
    "drop",
    "instruction record without (or with a null) instruction/inputs or output/targets, "
    "or a core-format line without instances",
  ),
  "instruction_not_string": ("drop", "instruction record field that is not a string"),
  "instruction_empty_prompt": ("drop", "instruction record whose instruction/inputs is blank"),
  "instruction_empty_response": ("drop", "instruction record whose output/targets is blank"),
  "instruction_response_cut": (
    "filter",
    "instruction example whose prompt fills the sequence length (no response token left)",
  ),
  # Conversation records (data/conversations.py has the format).
  "conversation_bad_json": ("drop", "conversation line that is not a JSON object"),
  "conversation_bad_turns": (
    "drop",
    "conversations missing or not a list of {from, value} with string values and known roles",
  ),
  "conversation_roles": (
    "drop",
    "roles not alternating human, assistant from a human turn, or ending with a human turn",
  ),
  "conversation_empty_value": ("drop", "conversation turn whose value is blank"),
  "conversation_image_count": (
    "drop",
    "image not a path or list of paths, or <image> placeholders differing from the images",
  ),
  "conversation_modality_unknown": (
    "drop",
    "field holding vectors (or with a <name> placeholder) that is not a modality of the model",
  ),
  "conversation_modality_count": (
    "drop",
    "<name> placeholders differing in number from the record's vectors of that modality",
  ),
  "conversation_modality_missing": ("drop", "modality .npy file missing or unreadable"),
  "conversation_modality_width": (
    "drop",
    "modality vector not one row of finite numbers of the modality's configured width",
  ),
  "conversation_bad_boxes": (
    "drop",
    "boxes not [[x0, y0, x1, y1], ...] numbers, unknown box_units, or <box> markers "
    "differing from the boxes in number",
  ),
  "conversation_box_outside": (
    "drop",
    "box outside [0, 1] of the picture or with x0 >= x1 or y0 >= y1 (pixel boxes: divided "
    "by the first picture's size; no picture: outside)",
  ),
  "conversation_answer_cut": (
    "filter",
    "conversation example cut by the sequence length before its first answer token",
  ),
}
__doc__ += "".join(f"\n  {n:27s}{k:7s} {r}" for n, (k, r) in REASONS.items())
REASON_NAMES = tuple(REASONS)
_STRICT = np.array([REASONS[n][0] != "filter" for n in REASON_NAMES])


def reason_index(name: str) -> int:
  return REASON_NAMES.index(name)


def no_issues() -> tf.Tensor:
  return tf.zeros([len(REASON_NAMES)], tf.int32)


def issue(name: str, count=1) -> tf.Tensor:
  """An `_issues` vector with `count` at `name`; for counts [b] (one per
  record of a batch), `_issues` vectors [b, len(REASONS)]."""
  return tf.expand_dims(tf.cast(count, tf.int32), -1) * tf.one_hot(
    reason_index(name), len(REASON_NAMES), dtype=tf.int32
  )


def with_issues(example: dict, issues: tf.Tensor, drop=False) -> dict:
  """Adds `issues` to the example's `_issues` and ors `drop` into `_drop`."""
  example = dict(example)
  example["_issues"] = example.get("_issues", no_issues()) + issues
  example["_drop"] = tf.logical_or(example.get("_drop", False), drop)
  return example


class DataStats:
  """Per-reason counters (a tf.Variable) shared by the pipelines that use them.

  `as_dict()` gives `records_in` (records that entered `count_input`),
  `records_out` (kept), `records_dropped` (dropped for a counted reason),
  `decode_errors` (records that vanished through `ignore_errors`: in, minus out,
  minus dropped; exact once the pipeline is drained, approximate while
  elements are in flight) and one count per reason.
  """

  def __init__(self):
    with tf.init_scope():
      self._counts = tf.Variable(tf.zeros([len(REASON_NAMES) + 3], tf.int64), trainable=False)

  def _add(self, index: int, value):
    return self._counts.assign_add(
      tf.cast(value, tf.int64) * tf.one_hot(index, len(REASON_NAMES) + 3, dtype=tf.int64)
    )

  def count_input(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Counts the records entering the pipeline."""

    @tf.autograph.experimental.do_not_convert
    def count(example):
      with tf.control_dependencies([self.input_counted()]):
        return tf.nest.map_structure(tf.identity, example)

    return dataset.map(count, num_parallel_calls=tf.data.AUTOTUNE)

  def input_counted(self):
    """The update op that counts one record in; for a map function that
    counts its own input (whatever might fail in it must depend on this op)."""
    return self._add(len(REASON_NAMES), 1)

  def record(self, issues: tf.Tensor, dropped: tf.Tensor):
    """Adds one record's issues; returns the update op."""
    update = tf.concat(
      [
        tf.cast(issues, tf.int64),
        tf.constant([0], tf.int64),
        tf.where(dropped, tf.constant([0, 1], tf.int64), tf.constant([1, 0], tf.int64)),
      ],
      0,
    )
    return self._counts.assign_add(update)

  def as_dict(self) -> dict[str, int]:
    counts = self._counts.numpy().tolist()
    n = len(REASON_NAMES)
    records_in, records_out, dropped = counts[n:]
    out = dict(
      records_in=records_in,
      records_out=records_out,
      records_dropped=dropped,
      decode_errors=max(records_in - records_out - dropped, 0),
    )
    out.update(zip(REASON_NAMES, counts[:n]))
    return out

  def reset(self):
    self._counts.assign(tf.zeros_like(self._counts))


_DEFAULT_STATS = None


def default_stats() -> DataStats:
  """The process-wide `DataStats` the registered tasks count into."""
  global _DEFAULT_STATS
  if _DEFAULT_STATS is None:
    _DEFAULT_STATS = DataStats()
  return _DEFAULT_STATS


def filter_and_count(
  dataset: tf.data.Dataset, stats: DataStats | None = None, strict: bool = False
) -> tf.data.Dataset:
  """Counts `_issues`, drops records marked `_drop`, removes both features.

  With `strict`, a record with any "drop" or "repair" reason fails the
  pipeline with an InvalidArgumentError that names its `key` and the reasons.
  """
  stats = stats or default_stats()
  names = tf.constant(REASON_NAMES)
  strict_mask = tf.constant(_STRICT)

  # Counting happens in the filter's predicate and the map only strips the
  # two features: one stage fewer per record than count, filter, strip.
  @tf.autograph.experimental.do_not_convert
  def count_and_keep(example):
    issues, drop = example["_issues"], example["_drop"]
    deps = [stats.record(issues, drop)]
    if strict:
      bad = tf.logical_and(issues > 0, strict_mask)
      deps.append(
        tf.debugging.Assert(
          tf.logical_not(tf.reduce_any(bad)),
          ["bad record, key:", example.get("key", "?"), "reasons:", tf.boolean_mask(names, bad)],
        )
      )
    with tf.control_dependencies(deps):
      return tf.logical_not(drop)

  @tf.autograph.experimental.do_not_convert
  def strip(example):
    return {k: v for k, v in example.items() if k not in ("_issues", "_drop")}

  return dataset.filter(count_and_keep).map(strip, num_parallel_calls=tf.data.AUTOTUNE)
