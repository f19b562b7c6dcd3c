"""The evaluation runner: bucketed batches, answers back to their queries, skips counted."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from kosmos_jax import config as config_lib
from kosmos_jax.data import loader
from kosmos_jax.eval import common, rec, runner
from kosmos_jax.models import generation
from kosmos_jax.processing import processor as processor_lib

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


class _CountImages:
  """Answers each row with the location token numbered by its image slots."""

  def __init__(self, vocab):
    self.vocab, self.pixels = vocab, []

  def generate(self, input_ids, pixel_values, attention_mask, image_embeds_position_mask, **kw):
    self.pixels.append(pixel_values.shape)
    new = [
      [self.vocab.patch_index_id(int(m.sum())), self.vocab.eos_id]
      for m in image_embeds_position_mask
    ]
    return np.concatenate([input_ids, np.array(new)], axis=1)


def test_few_shot_queries_run_interleaved(processor):
  """Demonstrations come first, each image with its own slots, one batch per image count."""
  picture = np.full((8, 8, 3), 90, np.uint8)
  demos = ((picture, "a red circle."), (picture, "a blue square."))
  queries = [
    common.Query("0", picture, "an image of", demonstrations=demos),
    common.Query("1", picture, "an image of"),
    common.Query("2", picture, "an image of", demonstrations=demos[:1]),
  ]
  dataset = common.Dataset("t", "val", queries, None, common.Decoding())
  model = _CountImages(processor.vocab)
  predictions, _ = runner.predict(model, processor, _Task, dataset, batch_size=2)
  n = processor.num_image_tokens
  assert predictions == {
    0: f"0:<patch_index_{3 * n:04d}>",
    1: f"1:<patch_index_{n:04d}>",
    2: f"2:<patch_index_{2 * n:04d}>",
  }
  # Images per row: 1 in transformers' flat layout [b, C, H, W], else [b, n, C, H, W].
  assert sorted(s[1] if len(s) == 5 else 1 for s in model.pixels) == [1, 2, 3]
  text, images = processor_lib.few_shot_prompt(demos, picture, "an image of")
  assert text == "<image> a red circle. <image> a blue square. <image> an image of"
  assert len(images) == 3


def test_hlines_round_trip_and_refuse_a_short_file(tmp_path):
  path = str(tmp_path / "p.txt")
  common.write_hlines(path, 3, {0: "<phrase>a</phrase>", 2: "b"})
  assert open(path).read().splitlines()[1] == "H-1\tnan\t"
  assert common.read_hlines(path, 3) == {0: "<phrase>a</phrase>", 2: "b"}
  with pytest.raises(ValueError, match="2 H-lines for 3 queries"):
    open(path, "w").write("S-0\tsource\nH-0\t-0.1\ta\nH-1\t-0.2\tb\n")
    common.read_hlines(path, 3)


def test_two_hosts_add_sums_and_gather_predictions_once(processor, tmp_path, monkeypatch):
  """Two processes, run one after the other with the collectives faked: sums
  are added (not means averaged) and process 0 writes every prediction."""
  from jax.experimental import multihost_utils

  picture = np.full((8, 8, 3), 200, np.uint8)
  queries = [common.Query(str(i), picture, "a" * (i + 1)) for i in range(5)]
  dataset = common.Dataset("t", "val", queries, None, common.Decoding())
  seen_sums = []

  class _Additive(_Task):
    predictions_file = "p.json"

    @staticmethod
    def sums(dataset, predictions):
      return {"hits": float(len(predictions)), "count": float(len(predictions))}

    @staticmethod
    def from_sums(dataset, sums):
      seen_sums.append(sums)
      return {"accuracy": sums["hits"] / sums["count"], "count": sums["count"]}

    @staticmethod
    def write_predictions(path, dataset, predictions):
      json.dump(predictions, open(path, "w"))

  others = []  # the other host's values, in the order of our process_sum calls

  def allgather(values):
    other = others.pop(0) if others else np.zeros_like(values)
    return np.stack([values, other])

  monkeypatch.setattr(runner.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  out = str(tmp_path / "eval")
  model = _CountImages(processor.vocab)
  # Host 1 first; it keeps its part file, which host 0 reads after the barrier.
  monkeypatch.setattr(runner.jax, "process_index", lambda: 1)
  monkeypatch.setattr(runner.os, "remove", lambda path: None)
  _, mine = runner.evaluate(model, processor, _Additive, dataset, out=out, batch_size=2)
  assert sorted(mine) == [1, 3]  # every second query
  monkeypatch.undo()
  monkeypatch.setattr(runner.jax, "process_count", lambda: 2)
  monkeypatch.setattr(runner.jax, "process_index", lambda: 0)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  # Host 1's sums: skipped (2 reasons, none), then count and hits (sorted keys).
  others.extend([np.zeros(2), np.array([2.0, 2.0])])
  metrics, merged = runner.evaluate(model, processor, _Additive, dataset, out=out, batch_size=2)
  assert sorted(merged) == [0, 1, 2, 3, 4]
  assert json.load(open(os.path.join(out, "p.json"))).keys() == {"0", "1", "2", "3", "4"}
  assert seen_sums[-1] == {"count": 5.0, "hits": 5.0} and metrics["count"] == 5.0
