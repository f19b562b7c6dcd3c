"""Boxes <-> location tokens and entity extraction, against transformers' code."""

import random
import re

import pytest
from transformers.models.kosmos2 import processing_kosmos2 as hf

from kosmos_jax.processing import grounding
from tests.helpers import spm as spm_util

SNOWMAN = (
  "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
  "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005>"
  "<patch_index_0911></object>."
)


def _boxes(n, seed=0):
  rng = random.Random(seed)
  out = []
  while len(out) < n:
    box = spm_util.random_box(rng)
    if len(box) == 4:
      out.append(box)
  return out


def test_worked_examples():
  assert grounding.patch_indices_to_box(44, 863) == (0.390625, 0.046875, 0.984375, 0.828125)
  box = (0.0, 0.0, 0.5, 0.5)
  assert grounding.box_to_patch_indices(box) == (0, 15 * 32 + 15)
  assert grounding.box_to_patch_indices(box, quantizer="original") == (0, 16 * 32 + 16)
  assert grounding.box_to_patch_indices((-0.1, 0.2, 1.2, 0.3), quantizer="original") == (
    6 * 32,
    9 * 32 + 31,
  )
  with pytest.raises(ValueError):
    grounding.box_to_patch_indices((0.5, 0.1, 0.5, 0.2))


def test_quantizer_and_boxes_match_transformers():
  for p in (32, 16, 7):
    for box in _boxes(500, seed=p):
      assert grounding.box_to_patch_indices(box, p) == hf.coordinate_to_patch_index(box, p)
  rng = random.Random(1)
  for _ in range(2000):
    ul, lr = rng.randrange(1024), rng.randrange(1024)
    assert grounding.patch_indices_to_box(ul, lr) == hf.patch_index_to_coordinate(ul, lr, 32)


@pytest.mark.parametrize("quantizer", ["hf", "original"])
def test_round_trip_within_one_bin(quantizer):
  for p in (32, 20):
    for box in _boxes(1000, seed=p):
      back = grounding.patch_indices_to_box(*grounding.box_to_patch_indices(box, p, quantizer), p)
      assert all(abs(a - b) <= 1 / p + 1e-9 for a, b in zip(box, back)), (box, back)


def test_markup():
  assert grounding.object_markup([(44, 863), (5, 911)]) == (
    "<object><patch_index_0044><patch_index_0863></delimiter_of_multi_objects/>"
    "<patch_index_0005><patch_index_0911></object>"
  )
  assert grounding.phrase_markup(" a dog", []) == "<phrase> a dog</phrase>"
  assert grounding.reg_prompt((0.0, 0.0, 0.5, 0.5)) == (
    "<phrase> It</phrase><object><patch_index_0000><patch_index_0495></object> is"
  )
  assert grounding.render_grounded_text("An image of a snowman.", [(12, 21, [(44, 863)])]) == (
    "An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>."
  )


def test_extraction_recovers_rendered_entities():
  rng = random.Random(2)
  words = spm_util.lexicon()
  for _ in range(500):
    tokens = [rng.choice(words) for _ in range(rng.randint(1, 12))]
    text = " ".join(tokens)
    starts = [sum(len(t) + 1 for t in tokens[:i]) for i in range(len(tokens))]
    spans, chosen = [], sorted(rng.sample(range(len(tokens)), rng.randint(0, min(3, len(tokens)))))
    for i in chosen:
      boxes = _boxes(rng.randint(1, 3), seed=rng.randrange(10**6))
      spans.append((starts[i], starts[i] + len(tokens[i]), boxes))
    marked = grounding.render_grounded_text(text, spans)
    clean, entities = grounding.clean_text_and_extract_entities(marked)
    assert clean == text
    assert [(e[0], e[1]) for e in entities] == [
      (tokens[i], (s, e)) for i, (s, e, _) in zip(chosen, spans)
    ]
    for (_, _, boxes), (_, _, got) in zip(spans, entities):
      for box, back in zip(boxes, got):
        assert all(abs(a - b) <= 1 / 32 + 1e-9 for a, b in zip(box, back))


def _markup_soup(rng, words):
  """Grounded text with random deletions, swaps and stray markup."""
  fragments = [
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<patch_index_0044>",
    "<patch_index_7>",
    "<patch_index_99999>",
    "<patch_index_>",
    "<grounding>",
    "</image>",
    "<",
    ">",
    " ",
    "  ",
    "\n",
    "<x\ny>",
    "<p>",
  ]
  text, boxes = spm_util.random_grounded_example(rng, words)
  objects = iter(boxes or [])

  def add_object(match):
    entry = next(objects, None)
    entry = [entry] if isinstance(entry, tuple) else entry
    return match.group() + (grounding.object_markup(entry) if entry else "")

  text = re.sub("</phrase>", add_object, text)
  chars = list(text)
  for _ in range(rng.randint(0, 4)):
    op, at = rng.random(), rng.randint(0, len(chars))
    if op < 0.4:
      chars.insert(at, rng.choice(fragments))
    elif op < 0.7 and chars:
      del chars[min(at, len(chars) - 1)]
    elif chars:
      chars.insert(at, chars.pop(rng.randrange(len(chars))))
  return "".join(chars)


def test_extraction_matches_transformers_on_messy_text():
  rng = random.Random(3)
  words = spm_util.lexicon()
  cases = [SNOWMAN] + [_markup_soup(rng, words) for _ in range(3000)]
  for text in cases:
    assert grounding.clean_text_and_extract_entities(
      text
    ) == hf.clean_text_and_extract_entities_with_bboxes(text)
    generated = "<image>x</image>" + text
    assert grounding.post_process_generation(generated) == (
      hf.clean_text_and_extract_entities_with_bboxes(generated.split("</image>")[-1])
    )
    assert (
      grounding.post_process_generation(text, cleanup_and_extract=False)
      == text.split("</image>")[-1]
    )


def test_extraction_never_raises():
  rng = random.Random(4)
  alphabet = [
    "<",
    ">",
    "/",
    "phrase",
    "object",
    "patch_index_",
    "0",
    "9",
    "delimiter_of_multi_objects/",
    " ",
    "\n",
    "a",
    "é",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "<patch_index_",
    "9" * 400,
  ]
  for _ in range(3000):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    clean, entities = grounding.clean_text_and_extract_entities(text)
    assert isinstance(clean, str) and all(len(e) == 3 for e in entities)
