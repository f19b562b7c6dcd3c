"""Language-only instruction tasks: template, formats, loss on the response, bad records, mixing."""

import json

import ml_collections
import numpy as np
import pytest
import seqio
import tensorflow as tf

from kosmos_jax import errors
from kosmos_jax.data import (
  feature_converter,
  instruction_tasks,
  instructions,
  loader,
  quality,
  tasks,
)
from kosmos_jax.processing import vocab as vocab_lib
from tests.helpers import spm as spm_util


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
  return spm_util.train_tiny_spm(tmp_path_factory.mktemp("spm"))


def _write(path, rows) -> str:
  """JSON lines; a bytes or str row is written as it is (a bad line)."""
  with open(path, "wb") as f:
    for row in rows:
      line = json.dumps(row) if isinstance(row, dict) else row
      f.write((line.encode() if isinstance(line, str) else line) + b"\n")
  return str(path)


def test_template_and_formats():
  assert (
    instructions.prompt_text("Add them.", "2 3") == "Instruction: Add them.\nInput: 2 3\nResponse:"
  )
  assert instructions.prompt_text(" Add. ", " ") == "Instruction: Add.\nResponse:"
  core = {"instruction": "Sum.", "instances": [{"input": "1 2", "output": "3", "constraints": "x"}]}
  assert instructions.parse_line(json.dumps(core), "f:1") == [
    instructions.Record("f:1#0", "Instruction: Sum.\nInput: 1 2\nResponse:", "3")
  ]
  flan = instructions.parse_line(b'{"inputs": "Q?", "targets": "A", "task": "t"}', "f:2")
  assert flan == [instructions.Record("f:2", "Instruction: Q?\nResponse:", "A")]


def test_packed_batch_loss_on_responses_only(tmp_path, spm_file):
  vocab = vocab_lib.KosmosVocabulary(spm_file)
  rows = [
    {"instruction": "ba be", "input": "bi", "output": "bo bu"},  # Unnatural Instructions
    {"inputs": "ka ke ki", "targets": "ko"},  # FLAN
    {"instruction": "da", "instances": [{"input": None, "output": "do du", "constraints": "?"}]},
  ]
  path = _write(tmp_path / "mixed.jsonl", rows)
  instruction_tasks.register_instruction_task("itest_pack", {"train": path}, vocab, image_size=16)
  converter = feature_converter.MultimodalFeatureConverter(pack=True)
  lengths = {"targets": 96, "images": 1}
  (row,) = list(
    seqio.get_dataset("itest_pack", lengths, converter, shuffle=False).as_numpy_iterator()
  )
  pairs = [("Instruction: ba be\nInput: bi\nResponse:", "bo bu")]
  pairs += [("Instruction: ka ke ki\nResponse:", "ko"), ("Instruction: da\nResponse:", "do du")]
  inputs, targets, weights, segments = [], [], [], []
  for i, (prompt, response) in enumerate(pairs, 1):
    p, r = vocab.encode(prompt), vocab.encode(response)
    assert p and r and vocab.detokenize(r) == response
    inputs += [vocab.bos_id, *p, *r]
    targets += [*p, *r, vocab.eos_id]
    weights += [0] * len(p) + [1] * (len(r) + 1)
    segments += [i] * (len(p) + len(r) + 1)
  pad = lengths["targets"] - len(targets)
  np.testing.assert_array_equal(row["input_ids"], inputs + [vocab.pad_id] * pad)
  np.testing.assert_array_equal(row["targets"], targets + [vocab.pad_id] * pad)
  np.testing.assert_array_equal(row["loss_weights"], weights + [0] * pad)
  np.testing.assert_array_equal(row["segment_ids"], segments + [0] * pad)
  assert row["image_embeds_position_mask"].sum() == 0 and row["pixel_values"].shape == (
    1,
    3,
    16,
    16,
  )
  learnt = vocab.detokenize(row["targets"][row["loss_weights"] > 0], skip_special_tokens=False)
  assert learnt == "bo bu</s> ko</s> do du</s>"


def test_bad_records_are_counted_by_reason(tmp_path, spm_file):
  vocab = vocab_lib.KosmosVocabulary(spm_file)
  rows = [
    {"instruction": "ba", "input": "", "output": "bo"},
    "not json {",
    "[1, 2]",
    {"instruction": "ba"},
    {"instruction": 5, "output": "bo"},
    {"instruction": "ba", "input": ["bi"], "output": "bo"},
    {"inputs": "ba", "targets": "  "},
    {"instruction": " ", "output": "bo"},
    {"instruction": "ba", "instances": [{"input": "bi", "output": "bo"}, {"input": "bi"}, 3]},
    {"instruction": "ba", "instances": []},
    "",
    b'{"instruction": "ba", "output": "bo \xff"}',
    {"inputs": "ka", "targets": "ko"},
    {"instruction": " ".join(["ba be bi"] * 30), "output": "bo"},
  ]
  path = _write(tmp_path / "bad.jsonl", rows)
  instruction_tasks.register_instruction_task("itest_bad", {"train": path}, vocab, image_size=16)
  before = quality.default_stats().as_dict()
  task = seqio.get_mixture_or_task("itest_bad")
  kept = list(task.get_dataset({"targets": 32, "images": 1}, shuffle=False).as_numpy_iterator())
  counts = {k: v - before[k] for k, v in quality.default_stats().as_dict().items()}
  assert [x["key"].decode() for x in kept] == [f"{path}:{n}" for n in ("1", "9#0", "12", "13")]
  assert counts["records_in"] == 15 and counts["records_out"] == 4
  assert counts["records_dropped"] == 11 and counts["decode_errors"] == 0
  expected = dict(
    instruction_bad_json=2,
    instruction_field_missing=4,
    instruction_not_string=2,
    instruction_empty_response=1,
    instruction_empty_prompt=1,
    instruction_response_cut=1,
    text_invalid_utf8=1,
    truncated=1,
  )
  assert {k: v for k, v in counts.items() if k in quality.REASONS and v} == expected


def test_strict_names_file_and_line(tmp_path, spm_file):
  vocab = vocab_lib.KosmosVocabulary(spm_file)
  path = _write(tmp_path / "strict.jsonl", [{"inputs": "ba", "targets": "bo"}, "", "{oops"])
  instruction_tasks.register_instruction_task(
    "itest_strict", {"train": path}, vocab, image_size=16, strict=True
  )
  ds = seqio.get_mixture_or_task("itest_strict").get_dataset({"targets": 32, "images": 1})
  with pytest.raises(
    tf.errors.InvalidArgumentError, match=r"strict\.jsonl:3.*instruction_bad_json"
  ):
    list(ds.as_numpy_iterator())


def test_mixed_into_pretraining_at_its_rate(tmp_path, spm_file):
  """From a config: `data.instructions` joins a mixture at rate 1 beside text at 3: a quarter."""
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "t.txt").write_text("".join(f"ba be bi {i}\n" for i in range(20)))
  (tmp_path / "instructions").mkdir()
  _write(
    tmp_path / "instructions" / "a.jsonl",
    [{"instruction": "ba", "output": "bo"}, {"inputs": "ka", "targets": "ko"}],
  )
  tasks.register_kosmos2_tasks(spm_file, str(tmp_path), prefix="imix", image_size=16)
  tasks.register_mixture("imix_base", {"imix_text": 3})
  data = ml_collections.ConfigDict(
    dict(
      mixture="imix_base_instructions",
      spm_model_file="",
      data_dir=str(tmp_path),
      instructions=dict(mixture="imix_base", rate=1.0),
    )
  )
  loader.register_user_tasks(data)
  assert seqio.get_mixture_or_task("instructions").splits == ("train",)  # no validation files
  mix = seqio.get_mixture_or_task(data.mixture)
  ds = mix.get_dataset({"targets": 64, "images": 1}, shuffle=True, seed=0, num_epochs=None)
  # Mixtures keep only the model's features: an instruction example is the
  # one whose second token (the prompt's first) carries no loss.
  share = np.mean([x["loss_weights"][1] == 0 for x in ds.take(2000).as_numpy_iterator()])
  assert abs(share - 0.25) < 0.035, share  # 3.6 binomial sd


def test_config_mistakes_are_user_errors(tmp_path, spm_file):
  with pytest.raises(errors.UserError, match="unknown keys"):
    instruction_tasks.register_from_config(dict(mixture="shapes_mix", rates=1))
  with pytest.raises(errors.UserError, match="no mixture"):
    instruction_tasks.register_from_config(dict(mixture="nope", rate=1, files="x"))
  with pytest.raises(errors.UserError, match="rate"):
    instruction_tasks.register_from_config(dict(mixture="shapes_mix", files="x"))
  with pytest.raises(errors.UserError, match="files"):
    instruction_tasks.register_from_config(dict(), spm_model_file=spm_file)
