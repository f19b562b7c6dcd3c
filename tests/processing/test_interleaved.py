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
