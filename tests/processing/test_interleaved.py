"""Interleaved text and images in the processor (`<image>` placeholders), through generate."""

import os

import numpy as np
import pytest
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.data import loader
from kosmos_jax.eval import rec
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.processing import processor as processor_lib
from kosmos_jax.processing import vocab as vocab_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.load(os.path.join(ROOT, "configs/tiny.py"))
  processor = rec.processor_for(loader.vocabulary("shapes32_rec"), config.model)
  return Kosmos2(config.model, rngs=nnx.Rngs(0)), processor


def _pictures(n):
  rng = np.random.default_rng(0)
  return [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_each_placeholder_becomes_an_image_with_its_slots(tiny):
  _, processor = tiny
  a, b = _pictures(2)
  out = processor(text="<image> a red circle. <image> a", images=[a, b])
  ids, mask = out["input_ids"][0].tolist(), out["image_embeds_position_mask"][0]
  n, vocab = processor.num_image_tokens, processor.vocab
  assert out["pixel_values"].shape == (1, 2, 3, 32, 32)
  assert mask.sum() == 2 * n
  opens = [i for i, t in enumerate(ids) if t == vocab.tag_id("<image>")]
  closes = [i for i, t in enumerate(ids) if t == vocab.tag_id("</image>")]
  assert len(opens) == len(closes) == 2 and ids[0] == vocab.bos_id and opens[0] == 1
  for start, end in zip(opens, closes):
    assert ids[start + 1 : end] == vocab_lib.image_slot_ids(n) and mask[start + 1 : end].all()
  # The text between the images is the tokens of " a red circle."
  between = ids[closes[0] + 1 : opens[1]]
  assert processor.decode(between) == "a red circle."


def test_a_one_image_row_is_unchanged_beside_a_two_image_row(tiny):
  model, processor = tiny
  a, b, c = _pictures(3)
  alone = processor(text=["a red circle"], images=[a], padding_side="left")
  mixed = processor(
    text=["a red circle", "<image> a blue square. <image> a"],
    images=[[a], [b, c]],
    padding_side="left",
  )
  assert mixed["pixel_values"].shape == (2, 2, 3, 32, 32)
  assert not mixed["pixel_values"][0, 1].any()  # the padding image
  # The row's own ids are the flat layout's (transformers'), left padded.
  row = mixed["input_ids"][0][mixed["attention_mask"][0] == 1]
  np.testing.assert_array_equal(row, alone["input_ids"][0])
  first = model.generate(**alone, max_new_tokens=6)
  both = model.generate(**mixed, max_new_tokens=6)
  new = alone["input_ids"].shape[1]
  np.testing.assert_array_equal(
    both[0, mixed["input_ids"].shape[1] :][: first.shape[1] - new], first[0, new:]
  )


def test_placeholders_must_match_the_images(tiny):
  _, processor = tiny
  with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
    processor(text=["<image> a <image> b"], images=[_pictures(1)])


def test_few_shot_prompt_puts_demonstrations_first():
  text, images = processor_lib.few_shot_prompt([("A", " one. "), ("B", "two.")], "Q", "three")
  assert text == "<image> one. <image> two. <image> three" and images == ["A", "B", "Q"]


def test_processor_and_tf_data_path_agree_on_a_document(tiny):
  # The same interleaved document through the training path (tf ops) and the
  # processor: the same ids, slot mask and pixels (the tf path adds `</s>`).
  import io  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from kosmos_jax.data import preprocessors  # pylint: disable=g-import-not-at-top

  _, processor = tiny
  pictures = _pictures(3)
  captions = ["a red circle at the top left.", "a blue square.", "a green triangle"]
  encoded = []
  for p in pictures:
    buffer = io.BytesIO()
    Image.fromarray(p).save(buffer, "PNG")  # lossless: both sides decode the same pixels
    encoded.append(buffer.getvalue())
  # Items in order: image, caption, image, caption, ... (an image item has no text).
  doc = dict(
    key="d",
    texts=np.array([t for c in captions for t in (b"", c.encode())], object),
    images=np.array([d for png in encoded for d in (png, b"")], object),
  )
  spec = dict(
    key=tf.TensorSpec([], tf.string),
    texts=tf.TensorSpec([None], tf.string),
    images=tf.TensorSpec([None], tf.string),
  )
  ds = tf.data.Dataset.from_generator(lambda: iter([doc]), output_signature=spec)
  size, slots = processor.image_options.size[0], processor.num_image_tokens
  x = next(
    preprocessors.documents(
      ds, processor.vocab, image_size=size, transform="square", num_image_tokens=slots
    ).as_numpy_iterator()
  )
  out = processor(text=" ".join(f"<image> {c}" for c in captions), images=pictures)
  assert x["targets"].tolist() == out["input_ids"][0].tolist() + [processor.vocab.eos_id]
  assert x["image_mask"].tolist() == out["image_embeds_position_mask"][0].tolist() + [0]
  np.testing.assert_allclose(x["images"], out["pixel_values"][0], atol=1e-5)


def test_rows_with_0_1_and_3_images_generate_as_each_alone(tiny):
  model, processor = tiny
  a, b, c, d = _pictures(4)
  texts = ["a red", "<image> a red circle.", "<image> a. <image> b. <image> a green"]
  images = [[], [a], [b, c, d]]
  batch = processor(text=texts, images=images, padding_side="left")
  assert batch["pixel_values"].shape == (3, 3, 3, 32, 32)
  together = model.generate(**batch, max_new_tokens=5)
  width = batch["input_ids"].shape[1]
  for row, (text, pictures) in enumerate(zip(texts, images)):
    alone = processor(text=[text], images=[pictures] if pictures else None, padding_side="left")
    out = model.generate(**alone, max_new_tokens=5)
    new = out[0, alone["input_ids"].shape[1] :]
    np.testing.assert_array_equal(together[row, width : width + len(new)], new, err_msg=text)
