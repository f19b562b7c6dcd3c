"""Processor: parity with transformers' Kosmos2Processor on a tiny sentencepiece model."""

import io
import json
import os
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from kosmos_jax.processing.processor import Processor
from tests.helpers import spm as spm_util

TEXT_KEYS = ("input_ids", "attention_mask", "image_embeds_position_mask")


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
  return spm_util.make_tiny_processor_dir(tmp_path_factory.mktemp("kosmos_processor"))


@pytest.fixture(scope="module")
def ours(processor_dir):
  return Processor.from_pretrained(processor_dir)


@pytest.fixture(scope="module")
def hf(processor_dir):
  return {side: spm_util.hf_processor(processor_dir, side) for side in ("left", "right")}


def _images(rng, n):
  modes = ["RGB", "L", "RGBA", "P", "CMYK", "LA"]
  out = []
  for _ in range(n):
    w, h = rng.randint(8, 300), rng.randint(8, 300)
    pixels = np.random.default_rng(rng.randrange(10**6)).integers(0, 256, (h, w, 3), np.uint8)
    out.append(Image.fromarray(pixels).convert(rng.choice(modes)))
  return out


def _assert_same(got, want, keys):
  assert set(got) == set(k for k in want if k in keys or k == "pixel_values")
  for key in got:
    expected = np.asarray(want[key])
    assert got[key].shape == expected.shape, key
    if key == "pixel_values":
      np.testing.assert_allclose(got[key], expected, atol=1e-6, rtol=0)
    else:
      np.testing.assert_array_equal(got[key], expected, err_msg=key)


def _examples(n, seed):
  rng = random.Random(seed)
  words = spm_util.lexicon()
  return [spm_util.random_grounded_example(rng, words) for _ in range(n)]


def _batch_boxes(boxes):
  return None if all(b is None for b in boxes) else list(boxes)


def test_text_batches_match_transformers(ours, hf):
  examples = _examples(480, seed=0)
  for start in range(0, len(examples), 8):
    texts, boxes = zip(*examples[start : start + 8])
    side = ("left", "right")[start // 8 % 2]
    want = hf[side](text=list(texts), bboxes=_batch_boxes(boxes), padding=True)
    got = ours(text=list(texts), bboxes=_batch_boxes(boxes), padding=True, padding_side=side)
    _assert_same(got, want, TEXT_KEYS)


def test_image_batches_match_transformers(ours, hf):
  rng = random.Random(1)
  examples = _examples(60, seed=1)
  for start in range(0, len(examples), 6):
    texts, boxes = zip(*examples[start : start + 6])
    images = _images(rng, len(texts))
    side = ("left", "right")[start // 6 % 2]
    want = hf[side](text=list(texts), images=images, bboxes=_batch_boxes(boxes))
    got = ours(text=list(texts), images=images, bboxes=_batch_boxes(boxes), padding_side=side)
    _assert_same(got, want, TEXT_KEYS)


@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("add_eos_token", [False, True])
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_single_examples_match_transformers(
  ours, hf, with_image, add_eos_token, add_special_tokens
):
  rng = random.Random(2)
  kwargs = dict(add_eos_token=add_eos_token, add_special_tokens=add_special_tokens)
  for text, boxes in _examples(10, seed=2):
    image = _images(rng, 1)[0] if with_image else None
    want = hf["right"](text=text, images=image, bboxes=boxes, return_tensors="np", **kwargs)
    _assert_same(ours(text=text, images=image, bboxes=boxes, **kwargs), want, TEXT_KEYS)


def test_layout_with_image(ours):
  out = ours(text="<grounding>An image of", images=Image.new("RGB", (5, 7)))
  assert out["input_ids"].shape[0] == 1
  ids = out["input_ids"][0]
  assert ids[:2].tolist() == [0, ours.vocab.tag_id("<image>")]
  assert ids[2:66].tolist() == list(range(4, 68)) and ids[66] == ours.vocab.tag_id("</image>")
  assert out["image_embeds_position_mask"][0].tolist() == [0, 0] + [1] * 64 + [0] * (len(ids) - 66)
  assert out["pixel_values"].shape == (1, 3, 224, 224) and out["pixel_values"].dtype == np.float32


def test_images_only_and_input_kinds(ours, hf, tmp_path):
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (50, 70, 3), np.uint8)
  rgba = rng.integers(0, 256, (40, 30, 4), np.uint8)
  gray = rng.integers(0, 256, (20, 90), np.uint8)
  palette = Image.fromarray(rgb).convert("P")
  palette.info["transparency"] = 3
  path = tmp_path / "x.png"
  Image.fromarray(rgb).save(path)
  for image, reference in [
    (rgb, rgb),
    (rgba, rgba),
    (gray, Image.fromarray(gray)),
    (palette, palette),
    (Image.fromarray(rgb).convert("I"), Image.fromarray(rgb).convert("I")),
    (str(path), Image.open(path)),
    (path.read_bytes(), Image.open(path)),
  ]:
    want = hf["right"](images=reference)
    _assert_same(ours(images=image), want, ())


def test_image_errors_name_the_input(ours, tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match="broken.jpg"):
    ours(images=str(bad))
  with pytest.raises(ValueError, match="#1"):
    ours(images=[np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)])
  with pytest.raises(ValueError, match="shape"):
    ours(images=np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match="cannot read"):
    ours(images=b"\x00\x01")
  with pytest.raises(ValueError, match="unsupported"):
    ours(images=[io.BytesIO()])


def test_bbox_errors(ours):
  with pytest.raises(ValueError, match="not a box"):
    ours(text="<phrase>a</phrase>", bboxes=[[0.1, 0.2, 0.3, 0.4]])
  with pytest.raises(ValueError, match="pairs"):
    ours(text="<phrase>a</phrase>", bboxes=[(1, 2), (3, 4)])
  with pytest.raises(ValueError, match="x2 > x1"):
    ours(text="<phrase>a</phrase>", bboxes=[(0.5, 0.1, 0.4, 0.2)])
  with pytest.raises(ValueError, match="padding=True"):
    ours(text=["a", "a b c d"])


def test_decode_and_post_process_match_transformers(ours, hf):
  texts = [t for t, _ in _examples(40, seed=4)]
  batch = hf["left"](text=texts, images=_images(random.Random(4), 40))["input_ids"]
  for skip in (False, True):
    assert ours.batch_decode(np.asarray(batch), skip_special_tokens=skip) == (
      hf["left"].batch_decode(batch, skip_special_tokens=skip)
    )
  for ids in batch[:10]:
    decoded = ours.decode(ids, skip_special_tokens=True)
    assert ours.post_process_generation(decoded) == hf["left"].post_process_generation(decoded)
    assert ours.post_process_generation(decoded, False) == hf["left"].post_process_generation(
      decoded, False
    )


def test_hub_style_directory(processor_dir, tmp_path):
  # Hub snapshots keep the image settings in a flat preprocessor_config.json
  # (with `use_square_size`); some ask for tokenization-space clean-up.
  hub = tmp_path / "hub"
  shutil.copytree(processor_dir, hub)
  os.remove(hub / "processor_config.json")
  (hub / "preprocessor_config.json").write_text(
    json.dumps(
      dict(
        spm_util.KOSMOS_IMAGE_PROCESSOR,
        image_processor_type="CLIPImageProcessor",
        processor_class="Kosmos2Processor",
      )
    )
  )
  config = json.loads((hub / "tokenizer_config.json").read_text())
  (hub / "tokenizer_config.json").write_text(
    json.dumps(dict(config, clean_up_tokenization_spaces=True, padding_side="left"))
  )
  ours = Processor.from_pretrained(hub)
  reference = spm_util.hf_processor(hub, "left")
  reference.tokenizer.clean_up_tokenization_spaces = True
  assert ours.padding_side == "left" and ours.image_options.size == (224, 224)
  image = Image.new("RGB", (300, 200), (10, 200, 30))
  texts = ["a cat , is n't it ?", "<phrase>it</phrase> 's here ."]
  want = reference(text=texts, images=[image, image], bboxes=[None, [(1, 40)]])
  got = ours(text=texts, images=[image, image], bboxes=[None, [(1, 40)]])
  _assert_same(got, want, TEXT_KEYS)
  assert ours.batch_decode(got["input_ids"]) == reference.batch_decode(want["input_ids"])


def test_answer_cuts_at_eos_and_keeps_the_grounding(ours):
  vocab = ours.vocab
  prompt = [vocab.pad_id, vocab.bos_id, *vocab.encode("<grounding>")]
  grounded = vocab.encode(
    "<phrase> ba</phrase><object><patch_index_0000><patch_index_1023></object>"
  )
  after = vocab.encode(" bo")
  out = ours.answer(prompt, [*grounded, vocab.eos_id, *after])
  assert out["new_ids"] == [*grounded, vocab.eos_id]  # nothing after </s>
  assert out["text"] == "ba"
  (entity,) = out["entities"]
  assert entity["phrase"] == "ba" and entity["span"] == [0, 2]
  np.testing.assert_allclose(entity["boxes"], [[1 / 64, 1 / 64, 63 / 64, 63 / 64]])
  json.dumps(out)  # plain lists and numbers
  # A row stopped by a stop string ends in padding, which is dropped.
  stopped = ours.answer(prompt, [*after, vocab.pad_id, vocab.pad_id])
  assert stopped["new_ids"] == after and stopped["entities"] == []
