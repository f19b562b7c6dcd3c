"""REC scoring: IoU, parsing of generated text, the evaluator on a tiny model."""

import json
import os

import numpy as np
import pytest
import seqio
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.data import loader
from kosmos_jax.eval import boxes, rec, runner, tasks
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.processing import grounding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = "shapes32_rec"  # the tiny config's


def test_iou():
  assert boxes.iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
  assert boxes.iou((0, 0, 1, 1), (0.5, 0, 1.5, 1)) == pytest.approx(1 / 3)
  assert boxes.iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges
  assert boxes.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty union
  assert boxes.iou((1, 1, 0, 0), (0, 0, 1, 1)) == 0.0  # a reversed box has no area
  assert boxes.iou((0.2, 0.2, 0.4, 0.4), (0, 0, 1, 1)) == pytest.approx(0.04)


@pytest.mark.parametrize(
  "text, expected",
  [
    (
      "<grounding><phrase>the red circle</phrase>"
      "<object><patch_index_0017><patch_index_0034></object>",
      grounding.patch_indices_to_box(17, 34, 16),
    ),
    # Several boxes for the phrase: the first one is the answer.
    (
      "<phrase>x</phrase><object><patch_index_0000><patch_index_0255></delimiter_of_multi_objects/>"
      "<patch_index_0017><patch_index_0034></object>",
      grounding.patch_indices_to_box(0, 255, 16),
    ),
    # A box without a phrase still counts; so does one after other text.
    (
      "<grounding><phrase>a</phrase> is <object><patch_index_0017><patch_index_0034></object>",
      grounding.patch_indices_to_box(17, 34, 16),
    ),
    ("<grounding><phrase>the red circle</phrase>", None),  # no box: a miss
    ("<grounding><phrase>a</phrase><object><patch_index_0017></object>", None),  # half a pair
    ("<object><patch_index_0017><patch_index_0034>", None),  # unclosed
    ("", None),
  ],
)
def test_first_box(text, expected):
  assert rec.first_box(text, 16) == expected


class _Oracle:
  """Answers each prompt with the location tokens of a given box."""

  def __init__(self, vocab, answers):
    self.vocab, self.answers, self.calls = vocab, list(answers), []

  def generate(self, input_ids, pixel_values, attention_mask, image_embeds_position_mask, **kwargs):
    self.calls.append((input_ids.shape, kwargs))
    rows = []
    for ids in input_ids:
      box = self.answers.pop(0) if self.answers else None
      new = (
        [self.vocab.eos_id]
        if box is None
        else [
          self.vocab.tag_id("<object>"),
          *map(
            self.vocab.patch_index_id,
            grounding.box_to_patch_indices(box, self.vocab.num_patches_per_side),
          ),
          self.vocab.tag_id("</object>"),
          self.vocab.eos_id,
        ]
      )
      rows.append(np.concatenate([ids, new + [self.vocab.pad_id] * (5 - len(new))]))
    return np.stack(rows)


@pytest.fixture(scope="module")
def examples():
  return rec.task_examples(TASK, "validation", num_images=3)


@pytest.fixture(scope="module")
def tiny():
  return config_lib.load(os.path.join(ROOT, "configs/tiny.py"))


def test_task_examples_are_held_out_pictures_with_boxes(examples):
  assert len({e.key for e in examples}) == 3 and len(examples) >= 3
  for e in examples:
    assert e.key.startswith("test-") and e.image.shape == (32, 32, 3) and e.image.dtype == np.uint8
    assert e.expression.startswith("the ") and 0 <= e.box[0] < e.box[2] <= 1


def test_prompt_tokens_match_the_training_examples(examples, tiny):
  """The evaluator asks in exactly the tokens the REC task trains on."""
  vocab = loader.vocabulary(TASK)
  processor = rec.processor_for(vocab, tiny.model)
  task = seqio.get_mixture_or_task(TASK)
  trained = next(
    task.get_dataset(
      {"targets": 128, "images": 1}, split="validation", shuffle=False
    ).as_numpy_iterator()
  )
  ids = processor(text=[rec.prompt(examples[0].expression)], images=[examples[0].image])[
    "input_ids"
  ][0]
  np.testing.assert_array_equal(ids, trained["targets"][: len(ids)])
  assert trained["targets"][len(ids)] == vocab.tag_id("<object>")


def test_oracle_answers_score_by_iou(examples, tiny):
  vocab = loader.vocabulary(TASK)
  processor = rec.processor_for(vocab, tiny.model)
  dataset = rec.load("validation", 3, seqio_task=TASK)
  assert [e.box for e in dataset.truth["examples"]] == [e.box for e in examples]
  far = (0.9, 0.9, 1.0, 1.0)
  answers = [e.box for e in examples[:-1]] + [None]
  answers[0] = far if boxes.iou(far, examples[0].box) < 0.5 else (0.0, 0.0, 0.1, 0.1)
  predictions, skipped = runner.predict(_Oracle(vocab, answers), processor, rec, dataset)
  assert not skipped and sorted(predictions) == list(range(len(examples)))
  assert predictions[0].startswith(rec.prompt(examples[0].expression) + "<object>")
  assert rec.first_box(predictions[len(examples) - 1], vocab.num_patches_per_side) is None
  scores = rec.score(dataset, predictions)
  assert scores["rec_accuracy"] == pytest.approx((len(examples) - 2) / len(examples))
  assert scores["rec_no_box"] == pytest.approx(1 / len(examples))
  assert scores["rec_count"] == len(examples)
  # Summed over two "hosts" (halves of the predictions), the same metrics.
  halves = [{i: t for i, t in predictions.items() if i % 2 == r} for r in (0, 1)]
  sums = [rec.sums(dataset, h) for h in halves]
  total = {k: sums[0][k] + sums[1][k] for k in sums[0]}
  assert rec.from_sums(dataset, total) == rec.from_sums(dataset, rec.sums(dataset, predictions))


def test_random_tiny_model_gives_one_answer_per_example(examples, tiny, tmp_path):
  model = Kosmos2(tiny.model, rngs=nnx.Rngs(0))
  processor = rec.processor_for(loader.vocabulary(TASK), tiny.model)
  dataset = rec.load("validation", 3, seqio_task=TASK, max_new_tokens=4)
  metrics, predictions = runner.evaluate(
    model, processor, tasks.get("seqio_rec"), dataset, out=str(tmp_path), batch_size=2
  )
  assert len(predictions) == len(examples)
  for i, e in enumerate(examples):
    assert predictions[i].startswith(f"<grounding><phrase>{e.expression}</phrase>")
  assert {"rec_accuracy", "rec_mean_iou", "rec_no_box", "rec_count"} <= set(metrics)
  assert rec.read_predictions(str(tmp_path / "predictions.txt"), dataset) == predictions
  assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
