"""tf-op preprocessors: images, grounded rendering (== grounding.py), sequences, trimming."""

import io
import random

import numpy as np
import pytest
import seqio
import tensorflow as tf
from PIL import Image

from kosmos_jax.data import preprocessors, quality, tf_image, tf_text
from kosmos_jax.processing import grounding, images
from kosmos_jax.processing import vocab as vocab_lib
from tests.helpers import spm as spm_util

SLOTS = 4  # image tokens per image in these tests


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return vocab_lib.KosmosVocabulary(spm_util.train_tiny_spm(tmp_path_factory.mktemp("spm")))


def encode(array, fmt="PNG", **kw):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt, **kw)
  return buffer.getvalue()


def picture(h=30, w=50, channels=3, seed=0):
  small = (np.random.default_rng(seed).random((4, 6, channels)) * 255).astype(np.uint8)
  return np.asarray(Image.fromarray(small.squeeze()).resize((w, h), Image.BILINEAR))


def image_text_records(records, vocab, **kw):
  spec = dict(
    key=tf.TensorSpec([], tf.string),
    image=tf.TensorSpec([], tf.string),
    caption=tf.TensorSpec([], tf.string),
    ref_exps=tf.TensorSpec([None, 7], tf.float32),
  )
  ds = tf.data.Dataset.from_generator(lambda: iter(records), output_signature=spec)
  with seqio.utils.map_seed_manager(0):
    return preprocessors.image_text(ds, vocab, image_size=16, num_image_tokens=SLOTS, **kw)


@pytest.mark.parametrize(
  "fmt,channels",
  [
    ("PNG", 3),
    ("PNG", 4),
    ("PNG", 1),
    ("JPEG", 3),
    ("GIF", 3),
    ("WEBP", 3),
    ("WEBP", 4),
    ("BMP", 3),
  ],
)
def test_decode_square_matches_processor(fmt, channels):
  data = encode(picture(120, 200, channels), fmt)
  assert not tf_image.check_image_bytes(tf.constant(data)).numpy().any()
  pixels = tf_image.preprocess(tf.constant(data), 224, "square")
  diff = np.abs(pixels.numpy() - images.preprocess_image(data))
  # PIL and TF resize (and decode JPEG) slightly differently: about a pixel level.
  assert pixels.shape == (3, 224, 224) and diff.mean() < 0.02 and diff.max() < 0.1


def test_gif_first_frame():
  frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
  buffer = io.BytesIO()
  frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
  rgb = tf_image.decode_rgb(tf.constant(buffer.getvalue())).numpy()
  assert rgb.shape == (10, 20, 3) and rgb[..., 0].min() > 200 and rgb[..., 2].max() < 50


def test_crop_carries_boxes():
  image = tf.zeros([100, 200, 3])  # resized to 16 x 32, centre crop keeps x in [0.25, 0.75]
  boxes = tf.constant(
    [[0.3, 0.1, 0.5, 0.9], [0.0, 0.0, 0.1, 1.0], [0.2, 0.0, 0.4, 1.0], [0.74, 0.0, 0.8, 1.0]]
  )
  out, geometry = tf_image.resize_and_center_crop(image, 16)
  moved, keep = tf_image.crop_boxes(boxes, geometry)
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(moved[0], [0.1, 0.1, 0.5, 0.9], atol=1e-6)
  # Outside the crop; 75% inside; 17% inside (< 20%: dropped).
  np.testing.assert_array_equal(keep, [True, False, True, False])
  np.testing.assert_allclose(moved[2], [0.0, 0.0, 0.3, 1.0], atol=1e-6)


def test_grounded_rendering_equals_grounding_py(vocab):
  rng = random.Random(0)
  words = spm_util.lexicon()
  captions, raws, expected_spans = [], [], []
  for _ in range(60):
    caption = rng.choice(["", "  "]) + " ".join(
      rng.choice(words) for _ in range(rng.randint(1, 10))
    )
    caption += rng.choice(["", " é 東京.", " "])
    rows = []
    for _ in range(rng.randint(0, 5)):
      s = rng.randrange(len(caption))
      e = rng.randint(s + 1, len(caption))
      x1, x2 = sorted(rng.choice([rng.random(), rng.randrange(33) / 32]) for _ in range(2))
      y1, y2 = sorted(rng.random() for _ in range(2))
      rows.append([s, e, x1, y1, min(x2 + 1 / 64, 1.0), min(y2 + 1 / 64, 1.0), 0.9])
      if rng.random() < 0.3:  # a second box for the same phrase
        rows.append([s, e, 0.1, 0.2, 0.3, 0.4, 0.8])
    raw = np.array(rows, np.float32).reshape(-1, 7)
    groups = {}
    for r in raw.tolist():
      groups.setdefault((int(r[0]), int(r[1])), []).append(tuple(r[2:6]))
    kept, last = [], 0
    for s, e in sorted(groups):
      if s >= last:
        kept.append((s, e, groups[s, e]))
        last = e
    captions.append(caption)
    raws.append(raw)
    expected_spans.append(kept)
  # All captions as one batch: records must not leak into each other.
  rows = np.repeat(np.arange(len(raws)), [len(r) for r in raws]).astype(np.int32)
  spans, boxes, rows, _ = tf_text.clean_spans(
    np.concatenate(raws), rows, [len(c) for c in captions], 0.65
  )
  phrases, phrase_rows, boxes, box_phrase, _ = tf_text.select_spans(
    spans, boxes, rows, len(captions)
  )
  grounded = [rng.random() < 0.8 for _ in captions]
  prefix = [vocab.tag_id("<grounding>")]
  for quantizer in ("hf", "original"):
    ids = tf_text.grounded_caption_ids(
      vocab,
      tf.constant(captions),
      tf.constant(grounded),
      phrases,
      phrase_rows,
      boxes,
      box_phrase,
      prefix,
      quantizer,
    )
    for caption, kept, on, row in zip(captions, expected_spans, grounded, ids.to_list()):
      expected = (
        prefix + vocab.encode(grounding.render_grounded_text(caption, kept, quantizer=quantizer))
        if on
        else vocab.encode(caption)
      )
      assert row == expected, (caption, kept, quantizer)


def test_markup_in_data_text_stays_text(vocab):
  ids = vocab.encode_plain_tf(tf.constant(["a <image> b </s> <phrase>"]))[0].numpy()
  tags = {vocab.tag_id(t) for t in vocab_lib.TAGS} | {vocab.bos_id, vocab.eos_id, vocab.pad_id}
  assert not tags & set(ids.tolist())


def test_caption_layout_and_loss_weights(vocab):
  record = dict(
    key="k",
    image=encode(picture()),
    caption="ba be bi",
    ref_exps=np.array([[3, 5, 0.1, 0.1, 0.5, 0.5, 0.9]], np.float32),
  )
  for use_box_prob, grounded in ((0.0, False), (1.0, True)):
    x = next(
      image_text_records(
        [record], vocab, use_box_prob=use_box_prob, transform="square"
      ).as_numpy_iterator()
    )
    text = (
      vocab.encode("ba be bi")
      if not grounded
      else [vocab.tag_id("<grounding>")]
      + vocab.encode(grounding.render_grounded_text("ba be bi", [(3, 5, [(0.1, 0.1, 0.5, 0.5)])]))
    )
    assert x["targets"].tolist() == (
      [0, vocab.tag_id("<image>"), *range(4, 4 + SLOTS), vocab.tag_id("</image>")] + text + [2]
    )
    # Reference 1.10: nothing on <s>, <image>, the slots; from </image> on, </s> included.
    assert x["loss_weights"].tolist() == [0] * (2 + SLOTS) + [1] * (len(text) + 2)
    assert x["image_mask"].tolist() == [0, 0] + [1] * SLOTS + [0] * (len(text) + 2)
    assert x["images"].shape == (1, 3, 16, 16) and not x["_drop"]


def test_documents_and_text(vocab):
  spec = dict(
    key=tf.TensorSpec([], tf.string),
    texts=tf.TensorSpec([None], tf.string),
    images=tf.TensorSpec([None], tf.string),
  )
  doc = dict(
    key="d",
    texts=np.array([b"ba be", b"", b"bi bo"], object),
    images=np.array([b"", encode(picture()), b""], object),
  )
  ds = tf.data.Dataset.from_generator(lambda: iter([doc]), output_signature=spec)
  x = next(
    preprocessors.documents(ds, vocab, image_size=16, num_image_tokens=SLOTS).as_numpy_iterator()
  )
  block = [vocab.tag_id("<image>"), *range(4, 4 + SLOTS), vocab.tag_id("</image>")]
  assert x["targets"].tolist() == [0] + vocab.encode("ba be") + block + vocab.encode("bi bo") + [2]
  assert x["image_mask"].sum() == SLOTS and x["images"].shape == (1, 3, 16, 16)
  assert x["loss_weights"].tolist() == [0] + [1] * 2 + [0] * (SLOTS + 1) + [1] * 4
  ds = tf.data.Dataset.from_tensors(dict(key="t", text="ba be"))
  x = next(preprocessors.text_documents(ds, vocab, image_size=16).as_numpy_iterator())
  assert x["targets"].tolist() == [0] + vocab.encode("ba be") + [2] and x["images"].shape == (
    0,
    3,
    16,
    16,
  )


def _doc(images: int, text_ids: int = 3):
  """targets/mask of `<s> (t t t <image> s s </image>) * images t t t`."""
  mask, ids = [0], [0]
  for _ in range(images):
    ids += [5] * text_ids + [9, 4, 4, 8]
    mask += [0] * text_ids + [0, 1, 1, 0]
  ids += [5] * text_ids
  mask += [0] * text_ids
  return dict(
    key="k",
    targets=ids,
    loss_weights=[1] * len(ids),
    image_mask=mask,
    images=tf.zeros([images, 3, 2, 2]),
  )


@pytest.mark.parametrize(
  "max_length,max_images,length,images",
  [
    (100, 4, 25, 3),  # fits
    (15, 4, 15, 2),  # cut at the token limit, after two whole images
    (13, 4, 11, 1),  # the limit falls inside the second image: cut before it
    (100, 1, 11, 1),  # image budget: cut before the second image
  ],
)
def test_trim_never_cuts_an_image(max_length, max_images, length, images):
  ds = preprocessors.trim(
    tf.data.Dataset.from_tensors(_doc(3)), {"targets": max_length, "images": max_images}
  )
  x = next(ds.as_numpy_iterator())
  assert len(x["targets"]) == length and x["images"].shape[0] == images
  assert x["image_mask"].sum() == 2 * images
  assert x["_issues"][quality.reason_index("truncated")] == (length < 25)


# --- bad input -----------------------------------------------------------------


def _zero_width_png():
  data = bytearray(encode(picture(4, 4)))
  data[16:20] = b"\0\0\0\0"  # IHDR width
  return bytes(data)


def _run(records, vocab, strict=False, max_length=64):
  stats = quality.DataStats()
  ds = image_text_records(
    records, vocab, use_box_prob=1.0, transform="square", stats=stats, strict=strict
  )
  ds = quality.filter_and_count(
    preprocessors.trim(ds, {"targets": max_length, "images": 1}), stats, strict
  )
  return {x["key"].decode(): x for x in ds.as_numpy_iterator()}, stats.as_dict()


def _record(key, image=None, caption="ba be bi bo", rows=()):
  return dict(
    key=key,
    image=encode(picture()) if image is None else image,
    caption=caption,
    ref_exps=np.array(rows, np.float32).reshape(-1, 7),
  )


def test_bad_images_are_dropped_and_counted(vocab):
  jpeg = encode(picture(), "JPEG")
  records = [
    _record("ok"),
    _record("garbage", b"not an image at all"),
    _record("empty", b""),
    _record("truncated", jpeg[: len(jpeg) // 2]),
    _record("zero", _zero_width_png()),
    _record("undecodable", b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9"),
  ]
  kept, counts = _run(records, vocab)
  assert list(kept) == ["ok"]
  assert (
    counts["image_unknown_format"],
    counts["image_missing"],
    counts["image_truncated"],
    counts["image_zero_size"],
  ) == (1, 1, 1, 1)
  assert (
    counts["decode_errors"] == 1 and counts["records_in"] == 6 and counts["records_dropped"] == 4
  )


def test_bad_boxes_and_spans_are_repaired(vocab):
  caption = "ba be bi bo"
  rows = [
    [0, 2, 0.5, 0.5, 0.1, 0.1, 0.9],  # inverted: swapped
    [3, 5, -0.2, 0.1, 0.5, 1.3, 0.9],  # outside: clipped
    [6, 8, np.nan, 0.1, 0.5, 0.5, 0.9],  # NaN: removed
    [9, 20, 0.1, 0.1, 0.5, 0.5, 0.9],  # end beyond the caption: removed
    [-1, 2, 0.1, 0.1, 0.5, 0.5, 0.9],  # negative start: removed
    [4, 7, 0.1, 0.1, 0.5, 0.5, 0.9],  # overlaps "be": removed
    [9, 11, 0.1, 0.1, 0.1, 0.5, 0.9],  # no area: removed
    [9, 11, 0.1, 0.1, 0.4, 0.5, 0.3],
  ]  # low score: filtered
  kept, counts = _run([_record("k", rows=rows)], vocab)
  expected = grounding.render_grounded_text(
    caption, [(0, 2, [(0.1, 0.1, 0.5, 0.5)]), (3, 5, [(0.0, 0.1, 0.5, 1.0)])]
  )
  slots = 2 + SLOTS + 1
  assert kept["k"]["targets"][slots:-1].tolist() == [vocab.tag_id("<grounding>")] + vocab.encode(
    expected
  )
  for reason in (
    "box_inverted",
    "box_outside",
    "box_nan",
    "span_overlap",
    "box_empty",
    "box_low_score",
  ):
    assert counts[reason] == 1, reason
  assert counts["span_out_of_range"] == 2 and counts["records_out"] == 1


def test_bad_text(vocab):
  kept, counts = _run(
    [
      _record("empty", caption="  "),
      _record("latin1", caption=b"caf\xe9 ba"),
      _record("long", caption=" ".join(["ba"] * 200)),
    ],
    vocab,
  )
  assert sorted(kept) == ["latin1", "long"]
  assert counts["text_empty"] == 1 and counts["text_invalid_utf8"] == 1 and counts["truncated"] == 1
  assert kept["latin1"]["targets"][2 + SLOTS + 1 : -1].tolist() == vocab.encode("caf\ufffd ba")
  assert len(kept["long"]["targets"]) == 64 and kept["long"]["image_mask"].sum() == SLOTS


def test_bad_image_inside_a_document_is_removed(vocab):
  doc = dict(
    key="d",
    texts=np.array([b"ba", b"", b"", b"be"], object),
    images=np.array([b"", b"\x89PNG broken", encode(picture()), b""], object),
  )
  spec = dict(
    key=tf.TensorSpec([], tf.string),
    texts=tf.TensorSpec([None], tf.string),
    images=tf.TensorSpec([None], tf.string),
  )
  stats = quality.DataStats()
  ds = preprocessors.documents(
    tf.data.Dataset.from_generator(lambda: iter([doc]), output_signature=spec),
    vocab,
    image_size=16,
    num_image_tokens=SLOTS,
    stats=stats,
  )
  x = next(quality.filter_and_count(ds, stats).as_numpy_iterator())
  assert x["images"].shape[0] == 1 and x["image_mask"].sum() == SLOTS
  counts = stats.as_dict()
  assert (
    counts["doc_image_dropped"] == 1
    and counts["image_unknown_format"] == 1
    and counts["records_out"] == 1
  )


def test_strict_mode_names_the_record(vocab):
  _run([_record("fine")], vocab, strict=True)
  with pytest.raises(tf.errors.InvalidArgumentError, match="bad-one"):
    _run(
      [_record("fine"), _record("bad-one", rows=[[0, 2, 0.5, 0.5, 0.1, 0.1, 0.9]])],
      vocab,
      strict=True,
    )
  with pytest.raises(tf.errors.InvalidArgumentError, match="image_truncated"):
    _run([_record("cut", encode(picture(), "JPEG")[:100])], vocab, strict=True)


def _referring(records, vocab, per_image, seed=0, expression_loss=False):
  spec = dict(
    key=tf.TensorSpec([], tf.string),
    image=tf.TensorSpec([], tf.string),
    expressions=tf.TensorSpec([None], tf.string),
    boxes=tf.TensorSpec([None, 4], tf.float32),
  )
  stats = quality.DataStats()
  ds = tf.data.Dataset.from_generator(lambda: iter(records), output_signature=spec)
  with seqio.utils.map_seed_manager(seed):
    ds = preprocessors.referring(
      ds,
      vocab,
      image_size=16,
      num_image_tokens=SLOTS,
      stats=stats,
      per_image=per_image,
      expression_loss=expression_loss,
    )
  return list(quality.filter_and_count(ds, stats).as_numpy_iterator()), stats.as_dict()


def _runs(x, start):
  """The tokens from `start` on, cut where the loss weight changes: prompt, target, .."""
  ids, weights = x["targets"][start:].tolist(), x["loss_weights"][start:].tolist()
  runs = [[ids[0]]]
  for i in range(1, len(ids)):
    if weights[i] != weights[i - 1]:
      runs.append([])
    runs[-1].append(ids[i])
  return runs


def test_referring_per_image_pays_the_picture_once(vocab):
  expressions = [b"ba", b"be bi", b"bo"]
  boxes = [[0.1, 0.1, 0.4, 0.4], [0.5, 0.2, 0.9, 0.6], [0.0, 0.6, 0.3, 1.0]]
  record = dict(
    key="k",
    image=encode(picture()),
    expressions=np.array(expressions, object),
    boxes=np.array(boxes, np.float32),
  )
  head = 3 + SLOTS  # <s> <image> slots </image>
  singles, _ = _referring([record], vocab, per_image=False)
  (joined,), counts = _referring([record], vocab, per_image=True)
  assert counts["records_in"] == 1 and joined["images"].shape == (1, 3, 16, 16)
  np.testing.assert_array_equal(joined["images"][0], singles[0]["images"][0])
  # The picture once, `<grounding>`, then each expression's prompt and target
  # as the single-expression examples have them (theirs after `<grounding>`),
  # in a seeded order, and `</s>` last with the final target.
  assert joined["targets"][: head + 1].tolist() == singles[0]["targets"][: head + 1].tolist()
  single_pairs = sorted((tuple(r[0][1:]), tuple(r[1][:4])) for r in map(_runs, singles, [head] * 3))
  runs = _runs(joined, head + 1)
  assert sorted((tuple(runs[i]), tuple(runs[i + 1][:4])) for i in (0, 2, 4)) == single_pairs
  assert len(runs) == 6 and runs[-1][-1] == vocab.eos_id
  assert joined["loss_weights"].sum() == 3 * 4 + 1
  first = {
    tuple(_runs(_referring([record], vocab, True, seed)[0][0], head + 1)[0]) for seed in range(8)
  }
  assert len(first) > 1  # which expression comes first varies with the seed


@pytest.mark.parametrize("per_image", [False, True])
def test_referring_expression_loss_weighs_the_phrases_too(vocab, per_image):
  record = dict(
    key="k",
    image=encode(picture()),
    expressions=np.array([b"ba", b"be bi"], object),
    boxes=np.array([[0.1, 0.1, 0.4, 0.4], [0.5, 0.2, 0.9, 0.6]], np.float32),
  )
  plain, _ = _referring([record], vocab, per_image)
  weighed, _ = _referring([record], vocab, per_image, expression_loss=True)
  head = 3 + SLOTS + 1  # <s> <image> slots </image> <grounding>
  phrase, close = vocab.tag_id("<phrase>"), vocab.tag_id("</phrase>")
  for a, b in zip(plain, weighed):
    assert a["targets"].tolist() == b["targets"].tolist()
    ids, w0, w1 = a["targets"], a["loss_weights"], b["loss_weights"]
    # Everything after <grounding> has loss; before it, nothing has, as before.
    assert w1[:head].sum() == 0 and w1[head:].min() == 1
    # The weights added are exactly the phrases' <phrase> .. </phrase>.
    inside = np.cumsum(ids == phrase) - np.cumsum(ids == close) + (ids == close)
    np.testing.assert_array_equal(w1 - w0, (inside > 0).astype(w1.dtype))


def test_referring_per_image_leaves_out_bad_expressions(vocab):
  record = dict(
    key="k",
    image=encode(picture()),
    expressions=np.array([b" ", b"ba", b"be"], object),
    boxes=np.array([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.5, 0.9], [0.2, 0.2, 0.6, 0.6]], np.float32),
  )
  bad = dict(record, key="bad", image=b"junk", expressions=np.array([b"bo"], object))
  (x,), counts = _referring(
    [record, dict(bad, boxes=np.array([[0, 0, 1, 1]], np.float32))], vocab, True
  )
  assert x["loss_weights"].sum() == 4 + 1  # only "be" is left
  assert counts["text_empty"] == 1 and counts["box_empty"] == 1
  assert counts["image_unknown_format"] == 1 and counts["records_in"] == 2
