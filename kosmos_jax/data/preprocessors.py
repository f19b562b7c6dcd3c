"""seqio preprocessors: records -> token sequences with images, all in tf ops.

Input schemas (what `sources.py` and the shapes TFDS builder produce):
  image-text  key, image (encoded bytes), caption, and for GrIT noun_chunks and
              ref_exps float32 [n, 7] (start, end, x1, y1, x2, y2, score);
  document    key, texts [n], images [n] encoded bytes: item i is an image when
              images[i] is non-empty, else the text texts[i];
  text        key, text.
Every family produces the same features, so tasks mix:
  targets       int32 [len]  `<s> ... </s>` (documents cut by `trim` have no `</s>`)
  loss_weights  int32 [len]  1 where the token is a prediction target: not `<s>`,
                             `<image>`, image slots or prompt (reference 1.10: a caption
                             pair is learnt from `</image>` on, `</s>` included)
  image_mask    int32 [len]  1 on image slots (2 on modality slots: conversation_tasks.py)
  images        float32 [k, 3, S, S]  the k images of the sequence, in slot order
  (modality_embeds float32 [m, D], modality_types int32 [m]: only conversation
  tasks of a model with modalities, conversation_tasks.py)
  key           string
plus `_issues`/`_drop` for `quality.filter_and_count`. The tasks in tasks.py
chain: family preprocessor -> `trim` -> `quality.filter_and_count`.
"""

import functools

import seqio
import tensorflow as tf

from kosmos_jax.data import quality, tf_image, tf_text
from kosmos_jax.processing import vocab as vocab_lib

_EMPTY_SPANS = tf.zeros([0, 7], tf.float32)


_BATCH = 128  # records per call of the batched text work in `image_text`


def _images(size: int, count=0) -> tf.Tensor:
  return tf.zeros([count, 3, size, size], tf.float32)


def _decode_checked(data: tf.Tensor, ok: tf.Tensor, size: int, transform: str):
  """`tf_image.decode_resized` only when `ok` (bad bytes would make the decoder
  raise); else zero pixels and, for "crop", a geometry that crops every box out."""
  geometry = tf.zeros([2, 4]) if transform == "crop" else None
  return tf.cond(
    ok,
    lambda: tf_image.decode_resized(data, size, transform),
    lambda: (tf.zeros([size, size, 3], tf.uint8), geometry),
  )


def _errors_tolerated(dataset: tf.data.Dataset, strict: bool) -> tf.data.Dataset:
  """Records whose decoding still fails vanish (counted as `decode_errors` in
  quality.DataStats); in strict mode the error stops the pipeline."""
  return dataset if strict else dataset.ignore_errors()


@tf.autograph.experimental.do_not_convert
def image_text_record(
  x: dict, seed, image_size: int, transform: str, phrase_mode: str, stats: quality.DataStats
) -> dict:
  """The per-record part of `image_text`: what needs one record at a time
  (counting it in, image checks and decoding, the seeded grounding draw)."""
  # Counted before anything that can fail: a record whose decoding fails still counts.
  with tf.control_dependencies([stats.input_counted()]):
    image_issues = tf_image.check_image_bytes(x["image"])
  # Blank before or after the UTF-8 repair alike (U+FFFD is not whitespace).
  empty = tf_text.is_blank(x["caption"])
  drop = empty | tf.reduce_any(image_issues > 0)
  pixels, geometry = _decode_checked(x["image"], ~drop, image_size, transform)
  rows = tf.reshape(
    x.get("ref_exps" if phrase_mode == "expression" else "noun_chunks", _EMPTY_SPANS), [-1, 7]
  )
  out = dict(
    key=x["key"],
    caption=x["caption"],
    pixels=pixels,
    image_issues=image_issues,
    empty=empty,
    drop=drop,
    draw=tf.random.stateless_uniform([], seed),
    rows=rows,
    num_rows=tf.shape(rows)[0],
  )
  if geometry is not None:
    out["geometry"] = geometry
  return out


# Called with autograph off, so that tf.data does not convert seqio's wrapper
# functions around ours either (converting them costs start-up time).
_image_text_record_map = tf.autograph.experimental.do_not_convert(
  seqio.map_over_dataset(image_text_record, num_seeds=1)
)


@tf.autograph.experimental.do_not_convert
def image_text_batch(
  x: dict,
  vocab: vocab_lib.KosmosVocabulary,
  use_box_prob: float,
  score_threshold: float,
  grounding_prefix: bool,
  quantizer: str,
  num_image_tokens: int,
) -> dict:
  """The text work of `image_text` on a padded batch of `image_text_record`
  outputs, vectorised over the records; features ragged [b, None]."""
  caption, issues = tf_text.repair_utf8(x["caption"])
  drop = x["drop"]
  issues += x["image_issues"] + quality.issue("text_empty", x["empty"])
  b = tf.size(drop)
  # The span rows, padded to [b, n, 7], as flat rows with their records.
  valid = tf.sequence_mask(x["num_rows"], tf.shape(x["rows"])[1])
  raw, rows = tf_text.select(
    tf.reshape(valid, [-1]),
    tf.reshape(x["rows"], [-1, 7]),
    tf.reshape(tf.broadcast_to(tf.range(b)[:, None], tf.shape(valid)), [-1]),
  )
  spans, boxes, rows, span_issues = tf_text.clean_spans(
    raw, rows, tf.strings.length(caption, unit="UTF8_CHAR"), score_threshold
  )
  keep = ~tf.gather(drop, rows)
  if "geometry" in x:
    boxes, in_crop = tf_image.crop_boxes(boxes, tf.gather(x["geometry"], rows))
    issues += quality.issue(
      "box_cropped_out", tf.math.unsorted_segment_sum(tf.cast(~in_crop & keep, tf.int32), rows, b)
    )
    keep &= in_crop
  issues += span_issues
  phrases, phrase_rows, boxes, box_phrase, overlap = tf_text.select_spans(
    *tf_text.select(keep, spans, boxes, rows), b
  )
  has_box = (
    tf.math.unsorted_segment_max(tf.ones_like(box_phrase), tf.gather(phrase_rows, box_phrase), b)
    > 0
  )
  grounded = (x["draw"] < use_box_prob) & has_box
  prefix = [vocab.tag_id("<grounding>")] if grounding_prefix else []
  ids = tf_text.grounded_caption_ids(
    vocab, caption, grounded, phrases, phrase_rows, boxes, box_phrase, prefix, quantizer
  )
  out = tf_text.join_rows(
    [tf_text.token_part(vocab.bos_id, weight=0), tf_text.image_part(vocab, num_image_tokens)],
    ids,
    [tf_text.token_part(vocab.eos_id)],
  )
  out.update(
    key=x["key"],
    images=tf_image.normalize(x["pixels"][:, None]),
    _issues=issues + overlap,
    _drop=drop,
  )
  return out


def image_text(
  dataset: tf.data.Dataset,
  vocab: vocab_lib.KosmosVocabulary,
  image_size: int = 224,
  transform: str = "crop",
  use_box_prob: float = 0.5,
  phrase_mode: str = "expression",
  score_threshold: float = 0.65,
  grounding_prefix: bool = True,
  quantizer: str = "hf",
  num_image_tokens: int = vocab_lib.NUM_IMAGE_TOKENS,
  strict: bool = False,
  stats: quality.DataStats | None = None,
) -> tf.data.Dataset:
  """Caption pairs and GrIT records.

  `<s> <image> slots </image> [<grounding>] caption </s>`, where with
  probability `use_box_prob` (if any box survives) the caption is grounded:
  `<phrase>..</phrase><object>..</object>` around the spans of `ref_exps`
  (`phrase_mode="expression"`) or `noun_chunks` ("phrase") whose score is at
  least `score_threshold`. Records without span fields are plain captions.
  Defaults follow KOSMOS-2's train.sh (reference 3.1); `transform` is "crop"
  (training) or "square" (inference).
  """
  dataset = _image_text_record_map(
    dataset,
    image_size=image_size,
    transform=transform,
    phrase_mode=phrase_mode,
    stats=stats or quality.default_stats(),
  )
  # A record whose decoding fails vanishes alone, before records are batched.
  dataset = _errors_tolerated(dataset, strict)
  # The text work costs about as much per call as per record: batched over
  # records, it is paid once per batch.
  batch = functools.partial(
    image_text_batch,
    vocab=vocab,
    use_box_prob=use_box_prob,
    score_threshold=score_threshold,
    grounding_prefix=grounding_prefix,
    quantizer=quantizer,
    num_image_tokens=num_image_tokens,
  )
  # padded_batch: ragged_batch would add a per-record conversion stage.
  dataset = dataset.padded_batch(_BATCH).map(batch, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.unbatch()


def object_ids(vocab, boxes: tf.Tensor, quantizer: str) -> tf.Tensor:
  """`<object><patch_index_a><patch_index_b></object>` per box: int32 [n, 4]."""
  pairs = tf_text.quantize_boxes(boxes, vocab.num_patches_per_side, quantizer)
  n = tf.shape(boxes)[0]
  tag = lambda name: tf.fill([n, 1], vocab.tag_id(name))
  return tf.concat([tag("<object>"), pairs + vocab.patch_index_id(0), tag("</object>")], 1)


def referring(
  dataset: tf.data.Dataset,
  vocab: vocab_lib.KosmosVocabulary,
  image_size: int = 224,
  quantizer: str = "hf",
  num_image_tokens: int = vocab_lib.NUM_IMAGE_TOKENS,
  strict: bool = False,
  stats: quality.DataStats | None = None,
  per_image: bool = False,
  expression_loss: bool = False,
) -> tf.data.Dataset:
  """Referring-expression comprehension, one example per (expression, box).

  Input: key, image, expressions [n], boxes float32 [n, 4]. Output:
  `<s> <image> slots </image> <grounding><phrase>{expression}</phrase>` as the
  prompt (no loss, `</image>` included) and `<object><patch_index_a><patch_index_b></object></s>`
  as the target: the REC prompt of the official evaluation (reference 2.7).
  Images get the square transform: a crop could cut the referent.

  `per_image`: one example per picture instead, its expressions in a seeded
  random order, each `<phrase>{expression}</phrase>` (no loss) followed by its
  `<object>..</object>` (loss), after one `<grounding>`. The first expression
  is the evaluation's prompt exactly; the picture and its slots are paid once
  for all its expressions (see `_referring_per_image`).

  `expression_loss`: the `<phrase>{expression}</phrase>` tokens get loss too,
  so the example also teaches naming what is in the picture (a REC example
  otherwise never asks for the words: the demo's model named shapes' kinds
  at chance with it off). The prompt at evaluation is the same.
  """
  if per_image:
    return _referring_per_image(
      dataset, vocab, image_size, quantizer, num_image_tokens, strict, stats, expression_loss
    )

  @tf.autograph.experimental.do_not_convert
  def per_expression(x):
    image_issues = tf_image.check_image_bytes(x["image"])
    drop = tf.reduce_any(image_issues > 0)
    boxes = tf.reshape(tf.cast(x["boxes"], tf.float32), [-1, 4])
    pixels = tf_image.normalize(_decode_checked(x["image"], ~drop, image_size, "square")[0])
    n = tf.shape(boxes)[0]
    return tf.data.Dataset.from_tensor_slices(
      dict(
        key=tf.fill([n], x["key"]),
        expression=x["expressions"],
        box=boxes,
        images=tf.tile(pixels[None, None], [n, 1, 1, 1, 1]),
        _issues=tf.tile(image_issues[None], [n, 1]),
        _drop=tf.fill([n], drop),
      )
    )

  @tf.autograph.experimental.do_not_convert
  def example(x):
    expression, issues = tf_text.repair_utf8(x["expression"])
    # The box as a one-character GrIT span, so that it gets the same checks.
    rows = tf.concat([tf.constant([[0.0, 1.0]]), x["box"][None], tf.constant([[1.0]])], 1)
    spans, boxes, _, box_issues = tf_text.clean_spans(rows, [0], [1], 0.0)
    pairs = tf.reshape(object_ids(vocab, boxes, quantizer), [-1])
    phrase = tf.concat(
      [
        [vocab.tag_id("<phrase>")],
        vocab.encode_plain_tf(expression[None])[0],
        [vocab.tag_id("</phrase>")],
      ],
      0,
    )
    image_ids, image_weights, image_mask = tf_text.image_part(vocab, num_image_tokens)
    out = tf_text.join(
      tf_text.token_part(vocab.bos_id, weight=0),
      (image_ids, tf.zeros_like(image_weights), image_mask),
      tf_text.token_part(vocab.tag_id("<grounding>"), weight=0),
      tf_text.text_part(phrase, weight=int(expression_loss)),
      tf_text.text_part(pairs),
      tf_text.token_part(vocab.eos_id),
    )
    out.update(key=x["key"], images=x["images"])
    bad = tf_text.is_blank(expression) | tf.equal(tf.size(spans), 0)
    return quality.with_issues(
      out,
      x["_issues"]
      + issues
      + box_issues[0]
      + quality.issue("text_empty", tf_text.is_blank(expression)),
      x["_drop"] | bad,
    )

  # Counted per expression: each one is a record of this task.
  dataset = (stats or quality.default_stats()).count_input(dataset.flat_map(per_expression))
  dataset = dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  return _errors_tolerated(dataset, strict)


def _referring_per_image(
  dataset, vocab, image_size, quantizer, num_image_tokens, strict, stats, expression_loss
):
  """`referring(per_image=True)`: a record is a picture. An expression that is
  blank or whose box is unusable is left out (counted by reason); a picture
  left with none, or whose image is bad, is dropped."""
  stats = stats or quality.default_stats()

  @tf.autograph.experimental.do_not_convert
  def example(x, seed):
    with tf.control_dependencies([stats.input_counted()]):
      image_issues = tf_image.check_image_bytes(x["image"])
    drop = tf.reduce_any(image_issues > 0)
    pixels = tf_image.normalize(_decode_checked(x["image"], ~drop, image_size, "square")[0])
    expressions, text_issues = tf_text.repair_utf8(x["expressions"])
    boxes = tf.reshape(tf.cast(x["boxes"], tf.float32), [-1, 4])
    n = tf.shape(boxes)[0]
    # Each box as a one-character GrIT span of its own expression, so that it
    # gets the same checks as a single-expression example.
    rows = tf.concat([tf.zeros([n, 1]), tf.ones([n, 1]), boxes, tf.ones([n, 1])], 1)
    _, boxes, kept, box_issues = tf_text.clean_spans(rows, tf.range(n), tf.ones([n], tf.int32), 0.0)
    blank = tf_text.is_blank(expressions)
    keep = ~tf.gather(blank, kept)
    kept, boxes = tf_text.select(keep, kept, boxes)
    order = tf.argsort(tf.random.stateless_uniform(tf.shape(kept), seed))
    kept, boxes = tf.gather(kept, order), tf.gather(boxes, order)
    phrases = vocab.encode_plain_tf(tf.gather(expressions, kept))
    k = tf.shape(kept)[0]
    dense = lambda ids: tf.RaggedTensor.from_tensor(tf.cast(ids, tf.int32))
    tag = lambda name: dense(tf.fill([k, 1], vocab.tag_id(name)))
    pieces = [
      tag("<phrase>"),
      phrases,
      tag("</phrase>"),
      dense(object_ids(vocab, boxes, quantizer)),
    ]
    ids = tf.concat(pieces, 1)
    weigh = tf.ones_like if expression_loss else tf.zeros_like
    weights = tf.concat([weigh(p) for p in pieces[:3]] + [tf.ones_like(pieces[3])], 1)
    image_ids, image_weights, image_mask = tf_text.image_part(vocab, num_image_tokens)
    ids, weights = ids.flat_values, weights.flat_values
    out = tf_text.join(
      tf_text.token_part(vocab.bos_id, weight=0),
      (image_ids, tf.zeros_like(image_weights), image_mask),
      tf_text.token_part(vocab.tag_id("<grounding>"), weight=0),
      (ids, weights, tf.zeros_like(ids)),
      tf_text.token_part(vocab.eos_id),
    )
    out.update(key=x["key"], images=pixels[None])
    issues = (
      image_issues
      + tf.reduce_sum(text_issues, 0)
      + tf.reduce_sum(box_issues, 0)
      + quality.issue("text_empty", tf.reduce_sum(tf.cast(blank, tf.int32)))
    )
    return quality.with_issues(out, issues, drop | tf.equal(k, 0))

  mapped = tf.autograph.experimental.do_not_convert(seqio.map_over_dataset(example, num_seeds=1))
  return _errors_tolerated(mapped(dataset), strict)


def documents(
  dataset: tf.data.Dataset,
  vocab: vocab_lib.KosmosVocabulary,
  image_size: int = 224,
  transform: str = "crop",
  num_image_tokens: int = vocab_lib.NUM_IMAGE_TOKENS,
  strict: bool = False,
  stats: quality.DataStats | None = None,
) -> tf.data.Dataset:
  """Interleaved image-text documents: `<s> item item .. </s>`, each image item
  as `<image> slots </image>`. A bad image is removed from its document
  (`doc_image_dropped` plus its reason); a document with no text is dropped."""
  dataset = (stats or quality.default_stats()).count_input(dataset)

  @tf.autograph.experimental.do_not_convert
  def example(x):
    texts, utf8 = tf.map_fn(
      tf_text.repair_utf8,
      x["texts"],
      fn_output_signature=(tf.string, tf.TensorSpec([len(quality.REASONS)], tf.int32)),
    )
    data = x["images"]
    is_image = tf.strings.length(data) > 0
    checks = tf.map_fn(tf_image.check_image_bytes, data, fn_output_signature=tf.int32)
    bad_image = is_image & tf.reduce_any(checks > 0, axis=1)
    keep = ~bad_image & (is_image | ~tf_text.is_blank(texts))
    texts, is_image, data = (tf.boolean_mask(t, keep) for t in (texts, is_image, data))
    issues = (
      tf.reduce_sum(utf8, 0)
      + tf.reduce_sum(tf.boolean_mask(checks, bad_image), 0)
      + quality.issue("doc_image_dropped", tf.reduce_sum(tf.cast(bad_image, tf.int32)))
    )
    no_text = tf.reduce_all(is_image)
    pixels = tf.map_fn(
      lambda d: tf_image.preprocess(d, image_size, transform),
      tf.boolean_mask(data, is_image),
      fn_output_signature=tf.TensorSpec([3, image_size, image_size], tf.float32),
    )
    out = tf_text.join(
      tf_text.token_part(vocab.bos_id, weight=0),
      tf_text.interleave(vocab, texts, is_image, num_image_tokens),
      tf_text.token_part(vocab.eos_id),
    )
    out.update(key=x["key"], images=pixels)
    return quality.with_issues(out, issues + quality.issue("text_empty", no_text), no_text)

  dataset = dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  return _errors_tolerated(dataset, strict)


def text_documents(
  dataset: tf.data.Dataset,
  vocab: vocab_lib.KosmosVocabulary,
  image_size: int = 224,
  stats: quality.DataStats | None = None,
) -> tf.data.Dataset:
  """Text-only documents: `<s> text </s>` (and an empty `images`, so that text
  tasks mix with image tasks)."""
  dataset = (stats or quality.default_stats()).count_input(dataset)

  @tf.autograph.experimental.do_not_convert
  def example(x):
    text, issues = tf_text.repair_utf8(x["text"])
    empty = tf_text.is_blank(text)
    out = tf_text.join(
      tf_text.token_part(vocab.bos_id, weight=0),
      tf_text.text_part(vocab.encode_plain_tf(text[None])[0]),
      tf_text.token_part(vocab.eos_id),
    )
    out.update(key=x["key"], images=_images(image_size))
    return quality.with_issues(out, issues + quality.issue("text_empty", empty), empty)

  return dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def drop_without_loss(dataset: tf.data.Dataset, reason: str) -> tf.data.Dataset:
  """After `trim`: an example left without a loss-carrying token (a prompt as
  long as the row) teaches nothing but fills a row: counted as `reason` and dropped."""

  @tf.autograph.experimental.do_not_convert
  def example(x):
    cut = tf.equal(tf.reduce_sum(x["loss_weights"]), 0) & ~x["_drop"]
    return quality.with_issues(x, quality.issue(reason, cut), cut)

  return dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def trim(dataset: tf.data.Dataset, sequence_length: dict[str, int]) -> tf.data.Dataset:
  """Fits each sequence into `sequence_length["targets"]` tokens,
  `sequence_length["images"]` images and (when given) `["modalities"]`
  modality vectors, without cutting an image or modality block.

  The cut goes before the first block that does not end inside the token
  limit or that exceeds its budget, else at the token limit. Counted as
  `truncated`; a sequence left with < 2 tokens is dropped.
  """
  max_length, max_images = sequence_length["targets"], sequence_length["images"]
  max_modalities = sequence_length.get("modalities")

  @tf.autograph.experimental.do_not_convert
  def example(x):
    mask = x["image_mask"]
    length = tf.size(mask)
    # A block runs from its opening tag (one before its first slot) to its
    # closing tag (one after its last); slot mask 1 = image, 2 = modality.
    slot = tf.cast(mask > 0, tf.int32)
    edges = slot[1:] - slot[:-1]
    starts = tf.cast(tf.where(tf.equal(edges, 1))[:, 0], tf.int32)
    ends = tf.cast(tf.where(tf.equal(edges, -1))[:, 0], tf.int32) + 1
    is_image = tf.equal(tf.gather(mask, starts + 1), 1)
    rank = lambda on: tf.cumsum(tf.cast(on, tf.int32)) - 1  # index among blocks of its kind
    bad = (ends >= max_length) | (is_image & (rank(is_image) >= max_images))
    if max_modalities is not None:
      bad |= ~is_image & (rank(~is_image) >= max_modalities)
    cut = tf.minimum(
      tf.minimum(length, max_length), tf.reduce_min(tf.where(bad, starts, max_length))
    )
    kept = lambda on: tf.reduce_sum(tf.cast((starts < cut) & on, tf.int32))
    out = dict(
      x,
      targets=x["targets"][:cut],
      loss_weights=x["loss_weights"][:cut],
      image_mask=mask[:cut],
      images=x["images"][: kept(is_image)],
    )
    for key in ("modality_embeds", "modality_types"):
      if key in x:
        out[key] = x[key][: kept(~is_image)]
    # A record already dropped for a reason is not counted again as too short.
    short = (cut < 2) & tf.logical_not(x.get("_drop", False))
    return quality.with_issues(
      out, quality.issue("truncated", cut < length) + quality.issue("too_short", short), cut < 2
    )

  return dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)
