"""The evaluation runner: bucketed batches, answers back to their queries, skips counted."""

import os

import numpy as np
import pytest
from PIL import Image

from kosmos_jax import config as config_lib
from kosmos_jax.data import loader
from kosmos_jax.eval import common, rec, runner
from kosmos_jax.models import generation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = "shapes32_rec"  # the tiny config's vocabulary


class _Echo:
  """Answers each row with the location token numbered by its prompt length."""

  def __init__(self, vocab):
    self.vocab, self.shapes = vocab, []

  def generate(self, input_ids, pixel_values, attention_mask, image_embeds_position_mask, **kw):
    self.shapes.append(input_ids.shape)
    assert kw["num_beams"] == 3 and kw["max_new_tokens"] == 5 and kw["no_repeat_ngram_size"] == 2
    new = [
      [self.vocab.patch_index_id(int(mask.sum())), self.vocab.eos_id, self.vocab.pad_id]
      for mask in attention_mask
    ]
    return np.concatenate([input_ids, np.array(new)], axis=1)


class _Task:
  """The part of a task module that `predict` calls."""

  @staticmethod
  def prediction(query, continuation):
    return f"{query.key}:{continuation}"


@pytest.fixture(scope="module")
def processor():
  tiny = config_lib.load(os.path.join(ROOT, "configs/tiny.py"))
  return rec.processor_for(loader.vocabulary(TASK), tiny.model)


def test_predict_buckets_prompts_and_counts_skipped_images(processor, tmp_path):
  picture = np.full((8, 8, 3), 200, np.uint8)
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"not a jpeg")
  on_disk = tmp_path / "ok.png"
  Image.fromarray(picture).save(on_disk)
  prompts = ["a", "a b c", "the red circle " * 6, "x", "the blue square " * 6, "y", "z"]
  images = [picture, str(on_disk), picture, str(tmp_path / "missing.jpg"), picture, broken, picture]
  dataset = common.Dataset(
    task="t",
    split="val",
    queries=[common.Query(str(i), im, p) for i, (im, p) in enumerate(zip(images, prompts))],
    truth=None,
    decoding=common.Decoding(num_beams=3, max_new_tokens=5, no_repeat_ngram_size=2),
  )
  model = _Echo(processor.vocab)
  predictions, skipped = runner.predict(model, processor, _Task, dataset, batch_size=2)
  assert dict(skipped) == {"image file missing": 1, "image unreadable": 1}
  assert sorted(predictions) == [0, 1, 2, 4, 6]
  for i, text in predictions.items():
    n = len(processor(text=prompts[i], images=picture)["input_ids"][0])
    assert text == f"{i}:<patch_index_{n:04d}>"
  # Every batch is full (short ones filled with copies) and one bucket long.
  assert all(shape[0] == 2 for shape in model.shapes)
  # Batches [2, 4], [0, 1], [3, 5] (both skipped: no call), [6]; longest bucket first.
  assert len(model.shapes) == 3
  buckets = [generation.bucket_length(s[1]) for s in model.shapes]
  assert buckets[0] > buckets[1] == buckets[2]


def test_predict_refuses_few_shot_until_interleaving_exists(processor):
  query = common.Query("0", np.zeros((8, 8, 3), np.uint8), "x", demonstrations=(("a.jpg", "y"),))
  dataset = common.Dataset("t", "val", [query], None, common.Decoding())
  with pytest.raises(ValueError, match="few-shot"):
    runner.predict(_Echo(processor.vocab), processor, _Task, dataset)


def test_hlines_round_trip_and_refuse_a_short_file(tmp_path):
  path = str(tmp_path / "p.txt")
  common.write_hlines(path, 3, {0: "<phrase>a</phrase>", 2: "b"})
  assert open(path).read().splitlines()[1] == "H-1\tnan\t"
  assert common.read_hlines(path, 3) == {0: "<phrase>a</phrase>", 2: "b"}
  with pytest.raises(ValueError, match="2 H-lines for 3 queries"):
    open(path, "w").write("S-0\tsource\nH-0\t-0.1\ta\nH-1\t-0.2\tb\n")
    common.read_hlines(path, 3)
