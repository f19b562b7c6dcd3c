"""Conversation tasks: template, loss on answers only, slots, modality vectors, boxes,
bad records, packing, registration from a config and `data inspect`."""

import json

import ml_collections
import numpy as np
import pytest
import seqio
import tensorflow as tf
from PIL import Image

from kosmos_jax import errors
from kosmos_jax.data import (
  conversation_tasks,
  feature_converter,
  loader,
  preprocessors,
  quality,
  tf_text,
)
from kosmos_jax.data import inspect as data_inspect
from kosmos_jax.processing import conversation
from kosmos_jax.processing import vocab as vocab_lib
from tests.helpers import spm as spm_util

MODALITIES = {"sound": 3, "depth": 5}  # sorted: depth = type 0, sound = type 1
IMAGE_TOKENS, MODALITY_TOKENS, SIZE = 4, 2, 16
LENGTHS = {"targets": 160, "images": 2, "modalities": 4}


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
  return spm_util.train_tiny_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def vocab(spm_file):
  return vocab_lib.KosmosVocabulary(spm_file, modalities=tuple(sorted(MODALITIES)))


def _write(path, rows) -> str:
  """JSON lines; a str row is written as it is (a bad line)."""
  with open(path, "w") as f:
    f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
  return str(path)


def _picture(path, size=(40, 20)) -> str:
  Image.new("RGB", size, (200, 30, 30)).save(path)
  return path.name


def _turns(*values):
  return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def _register(name, path, vocab, modalities=MODALITIES, **kwargs):
  conversation_tasks.register_conversation_task(
    name,
    {"train": path},
    vocab,
    image_size=SIZE,
    num_image_tokens=IMAGE_TOKENS,
    modalities=modalities,
    modality_tokens=MODALITY_TOKENS,
    **kwargs,
  )


def _examples(name, lengths=LENGTHS):
  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, shuffle=False)
  return list(ds.as_numpy_iterator())


def test_template_parts_and_roles():
  turns = [{"from": "User", "value": "ba"}, {"from": "assistant", "value": "bo"}]
  assert conversation.parts(turns) == [("Human: ba", False), (" Assistant:", False), (" bo", True)]
  assert (
    conversation.generation_prompt(turns, "ka")
    == "Human: ba Assistant: bo</s> Human: ka Assistant:"
  )
  assert conversation.problem(_turns("ba")) == conversation.ROLES_ORDER
  assert conversation.problem(_turns("ba", " ")) == conversation.EMPTY_VALUE
  assert conversation.problem([{"from": "robot", "value": "x"}]) == conversation.BAD_TURNS
  with pytest.raises(ValueError, match="roles"):
    conversation.parts(_turns("ba", "bo", "bi"))


def test_generation_prompt_is_the_training_prefix(tmp_path, spm_file):
  """Token level: `<s>` + generation_prompt(history, q) is the training
  sequence up to the answer of q, whose first token is the first with loss."""
  vocab = vocab_lib.KosmosVocabulary(spm_file)
  values = [
    "<grounding>Where is the <phrase>ba be</phrase>?\nbi",
    "It is <object><patch_index_0005><patch_index_0010></object> bo.",
    "ka  ke\n ki",
    "ko ku",
  ]
  path = _write(tmp_path / "t.jsonl", [{"conversations": _turns(*values)}])
  _register("ctest_prefix", path, vocab, modalities={})
  (x,) = _examples("ctest_prefix", {"targets": 128, "images": 1})
  prompt = conversation.generation_prompt(_turns(*values[:2]), values[2])
  ids = [vocab.bos_id, *vocab.encode(prompt)]
  n = len(ids)
  np.testing.assert_array_equal(x["targets"][:n], ids)
  assert x["loss_weights"][n - 1] == 0 and x["loss_weights"][n] == 1
  assert list(x["targets"]).count(vocab.eos_id) == 2  # one after each answer
  first = [vocab.bos_id, *vocab.encode(conversation.generation_prompt([], values[0]))]
  np.testing.assert_array_equal(x["targets"][: len(first)], first)


def test_loss_on_answers_only_with_slots_and_vectors(tmp_path, vocab):
  _picture(tmp_path / "a.png")
  np.save(tmp_path / "s.npy", np.array([[7.0, 8.0, 9.0]], np.float32))
  np.save(tmp_path / "d.npy", np.arange(5, dtype=np.float32))
  answers = ["ba <phrase>be</phrase> bi", "bo bu"]
  row = {
    "id": 7,
    "image": "a.png",
    "conversations": _turns(
      "<image>\nka <sound> ke?", answers[0], "<depth> ki <sound>", answers[1]
    ),
    "sound": [[1.0, 2.0, 3.0], "s.npy"],
    "depth": "d.npy",
  }
  _register("ctest_mask", _write(tmp_path / "c.jsonl", [row]), vocab)
  (x,) = _examples("ctest_mask")
  targets, weights, mask = x["targets"], x["loss_weights"], x["image_mask"]
  learnt = targets[weights == 1].tolist()
  expected = [*vocab.encode(" " + answers[0]), vocab.eos_id, *vocab.encode(" " + answers[1])]
  assert learnt == expected + [vocab.eos_id]
  assert set(weights.tolist()) == {0, 1} and not weights[mask > 0].any()
  assert (mask == 1).sum() == IMAGE_TOKENS and (mask == 2).sum() == 3 * MODALITY_TOKENS
  # Each block: its opening tag, slot ids, its closing tag, no loss on any.
  for name in ("sound", "depth"):
    opening, closing = vocab.modality_tag_ids(name)
    for at in np.flatnonzero(targets == opening):
      block = targets[at : at + MODALITY_TOKENS + 2].tolist()
      assert block == [opening, *vocab_lib.image_slot_ids(MODALITY_TOKENS), closing]
      assert mask[at + 1 : at + MODALITY_TOKENS + 1].tolist() == [2] * MODALITY_TOKENS
  assert x["images"].shape == (1, 3, SIZE, SIZE)
  np.testing.assert_array_equal(
    x["modality_embeds"], [[1, 2, 3, 0, 0], [0, 1, 2, 3, 4], [7, 8, 9, 0, 0]]
  )
  np.testing.assert_array_equal(x["modality_types"], [1, 0, 1])


def test_boxes_normalized_and_pixels_quantize_alike(tmp_path, vocab):
  _picture(tmp_path / "a.png", (40, 20))
  box = [0.1, 0.2, 0.6, 0.9]
  rows = [
    {
      "image": "a.png",
      "conversations": _turns("ka <box> ke?", "<grounding><phrase>bo</phrase><box>"),
      "boxes": [box, [0.0, 0.0, 1.0, 1.0]],
    },
    {
      "image": "a.png",
      "conversations": _turns("ka <box> ke?", "<grounding><phrase>bo</phrase><box>"),
      "boxes": [[4, 4, 24, 18], [0, 0, 40, 20]],
      "box_units": "pixels",
    },
  ]
  _register("ctest_box", _write(tmp_path / "b.jsonl", rows), vocab)
  normalized, pixels = _examples("ctest_box")
  np.testing.assert_array_equal(normalized["targets"], pixels["targets"])
  pairs = tf_text.quantize_boxes(tf.constant([box, [0.0, 0.0, 1.0, 1.0]]), 32).numpy()
  pairs += vocab.patch_index_id(0)
  obj = [vocab.tag_id("<object>"), vocab.tag_id("</object>")]
  expected = [[obj[0], *p, obj[1]] for p in pairs.tolist()]
  starts = np.flatnonzero(pixels["targets"] == obj[0])
  found = [pixels["targets"][s : s + 4].tolist() for s in starts]
  assert found == expected
  # The prompt's box carries no loss, the answer's does.
  assert pixels["loss_weights"][starts].tolist() == [0, 1]


def test_bad_records_are_counted_by_reason(tmp_path, vocab):
  _picture(tmp_path / "a.png")
  (tmp_path / "bad.png").write_text("not a picture")
  good = _turns("ka", "ko")
  with_image = lambda image, value="<image> ka": {
    "image": image,
    "conversations": _turns(value, "ko"),
  }
  rows = [
    {"conversations": good},  # kept
    "not json {",
    "[1, 2]",
    {"conversations": "ka"},
    {"id": 3},
    {"conversations": [{"from": "robot", "value": "ka"}, {"from": "gpt", "value": "ko"}]},
    {"conversations": _turns("ka")},
    {"conversations": _turns("ka", "ko", "ki")},
    {"conversations": []},
    {"conversations": [{"from": "gpt", "value": "ko"}, {"from": "human", "value": "ka"}]},
    {"conversations": _turns("ka", "  ")},
    with_image("missing.png"),
    with_image("bad.png"),
    with_image("a.png", "<image> ka <image>"),
    with_image(5),
    {"conversations": good, "audio": [0.5, 0.25]},
    {"conversations": _turns("<audio> ka", "ko"), "audio": "x"},
    {"conversations": good, "sound": "missing.npy"},
    {"conversations": good, "sound": [1.0, 2.0]},
    {"conversations": _turns("<sound> ka <sound>", "ko"), "sound": [1.0, 2.0, 3.0]},
    {"conversations": _turns("<box> ka", "ko")},
    {"conversations": good, "boxes": [[0.1, 0.2, 0.3]]},
    {"conversations": _turns("<box> ka", "ko"), "boxes": [[0.5, 0.5, 1.2, 0.9]]},
    {"conversations": _turns("<box> ka", "ko"), "boxes": [[0.5, 0.1, 0.5, 0.2]]},
    {"conversations": _turns("<box> ka", "ko"), "boxes": [[1, 1, 2, 2]], "box_units": "pixels"},
    {"conversations": _turns(" ".join(["ba be bi"] * 60), "ko")},
    "",
    {"image": "a.png", "conversations": _turns("ka", "<image> ko"), "sound": "s.npy", "x": "ok"},
  ]
  np.save(tmp_path / "s.npy", np.ones(3, np.float32))
  path = _write(tmp_path / "bad.jsonl", rows)
  _register("ctest_bad", path, vocab)
  before = quality.default_stats().as_dict()
  kept = _examples("ctest_bad", {"targets": 48, "images": 2, "modalities": 4})
  counts = {k: v - before[k] for k, v in quality.default_stats().as_dict().items()}
  assert [x["key"].decode() for x in kept] == [f"{path}:1", f"{path}:28"]
  assert counts["records_in"] == 27 and counts["records_out"] == 2
  assert counts["records_dropped"] == 25 and counts["decode_errors"] == 0
  expected = dict(
    conversation_bad_json=2,
    conversation_bad_turns=3,
    conversation_roles=4,
    conversation_empty_value=1,
    image_missing=1,
    image_unknown_format=1,
    conversation_image_count=2,
    conversation_modality_unknown=2,
    conversation_modality_missing=1,
    conversation_modality_width=1,
    conversation_modality_count=1,
    conversation_bad_boxes=2,
    conversation_box_outside=3,
    conversation_answer_cut=1,
    truncated=1,
  )
  assert {k: v for k, v in counts.items() if k in quality.REASONS and v} == expected
  # An image placeholder inside an answer: its block carries no loss either.
  last = kept[1]
  assert last["targets"][last["loss_weights"] == 1].tolist() == [*vocab.encode(" ko"), 2]


def test_strict_names_file_and_line(tmp_path, vocab):
  rows = [{"conversations": _turns("ka", "ko")}, "", {"conversations": _turns("ka", "ko", "ki")}]
  path = _write(tmp_path / "strict.jsonl", rows)
  _register("ctest_strict", path, vocab, strict=True)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"strict\.jsonl:3.*conversation_roles"):
    _examples("ctest_strict")


def test_packing_puts_vectors_in_slot_order(tmp_path, vocab):
  rows = [
    {"conversations": _turns("<sound> ka", "ko"), "sound": [[1.0, 1.0, 1.0]]},
    {"conversations": _turns("<depth> ka <sound>", "ko"), "sound": [3.0] * 3, "depth": [2.0] * 5},
    {"conversations": _turns("ka <sound>", "ko"), "sound": [[4.0] * 3]},
  ]
  _register("ctest_pack", _write(tmp_path / "p.jsonl", rows), vocab)
  converter = feature_converter.MultimodalFeatureConverter(pack=True)
  lengths = {"targets": 128, "images": 1, "modalities": 3}
  first, second = seqio.get_dataset(
    "ctest_pack", lengths, converter, shuffle=False
  ).as_numpy_iterator()
  # Two examples (3 vectors) fill the first row's budget; the third starts a row.
  assert first["segment_ids"].max() == 2 and second["segment_ids"].max() == 1
  np.testing.assert_array_equal(first["modality_embeds"][:, 0], [1, 2, 3])
  np.testing.assert_array_equal(first["modality_types"], [1, 0, 1])
  np.testing.assert_array_equal(second["modality_types"], [1, -1, -1])
  np.testing.assert_array_equal(second["modality_embeds"][1:], np.zeros([2, 5]))
  assert (first["image_embeds_position_mask"] == 2).sum() == 3 * MODALITY_TOKENS
  assert first["pixel_values"].shape == (1, 3, SIZE, SIZE)
  # Rows of a model with modalities need a budget for their vectors.
  with pytest.raises(ValueError, match="modalities"):
    converter(
      seqio.get_mixture_or_task("ctest_pack").get_dataset(LENGTHS), {"targets": 128, "images": 1}
    )


def test_from_config_and_inspect(tmp_path, spm_file):
  (tmp_path / "conversations").mkdir()
  _write(
    tmp_path / "conversations" / "a.jsonl",
    [{"conversations": _turns("<sound> ka", "ko ku"), "sound": [0.5, 0.5]}],
  )
  model = ml_collections.ConfigDict(
    dict(
      vision=dict(image_size=SIZE),
      latent_query_num=IMAGE_TOKENS,
      text=dict(num_patches_per_side=16),
      modalities=dict(sound=2),
      modality_tokens=3,
    )
  )
  data = ml_collections.ConfigDict(
    dict(
      spm_model_file=spm_file,
      data_dir=str(tmp_path),
      conversations=dict(name="ctest_cfg", files="", strict=True),
    )
  )
  try:
    loader.register_user_tasks(data, model)
    (example,) = data_inspect.examples("ctest_cfg", num=1)
  finally:
    # With data.spm_model_file, the kosmos2_* tasks were registered on this
    # test's folder: others would find them on files that no longer exist.
    for name in [n for n in seqio.TaskRegistry.names() if n.startswith("kosmos2_")]:
      seqio.TaskRegistry.remove(name)
    for name in ("kosmos2_pretrain", "kosmos2_kosmos1_pretrain"):
      seqio.MixtureRegistry.remove(name)
  assert example.text.startswith("<s> Human") and "<sound>[3 slots]</sound> ka" in example.text
  assert example.loss_text == "ko ku</s>" and example.num_loss_tokens == 3


def test_config_mistakes_are_user_errors(spm_file):
  model = lambda **more: ml_collections.ConfigDict(
    dict(vision=dict(image_size=32), latent_query_num=8, text=dict(num_patches_per_side=32), **more)
  )
  with pytest.raises(errors.UserError, match="unknown keys"):
    conversation_tasks.register_from_config(dict(file="x"), spm_model_file=spm_file)
  with pytest.raises(errors.UserError, match="files"):
    conversation_tasks.register_from_config({}, spm_model_file=spm_file)
  with pytest.raises(errors.UserError, match="modalities"):
    conversation_tasks.register_from_config(
      dict(mixture="shapes32_mix", rate=1.0, files="x"), model_config=model(modalities={"a": 2})
    )
  # Without modalities it joins a mixture at its rate.
  name = conversation_tasks.register_from_config(
    dict(mixture="shapes32_mix", rate=2.0, files="x", name="ctest_mixed"), model_config=model()
  )
  assert name == "shapes32_mix_ctest_mixed"
  assert seqio.get_mixture_or_task(name).get_rate(seqio.get_mixture_or_task("ctest_mixed")) == 2.0


def test_trim_keeps_modality_blocks_whole():
  """`<s> [sound a] [sound b] [sound c] x </s>` with 2-slot blocks (tag, 2, 2, tag)."""
  block = [0, 2, 2, 0]
  mask = [0] + block * 3 + [0, 0]
  example = dict(
    targets=tf.range(len(mask)),
    loss_weights=tf.ones([len(mask)], tf.int32),
    image_mask=tf.constant(mask),
    images=tf.zeros([0, 3, 2, 2]),
    modality_embeds=tf.reshape(tf.range(6, dtype=tf.float32), [3, 2]),
    modality_types=tf.constant([0, 1, 0]),
  )
  trim = lambda lengths: next(
    preprocessors.trim(tf.data.Dataset.from_tensors(example), lengths).as_numpy_iterator()
  )
  cut = trim({"targets": 64, "images": 1, "modalities": 2})  # budget: before the third block
  assert len(cut["targets"]) == 9 and cut["modality_types"].tolist() == [0, 1]
  np.testing.assert_array_equal(cut["modality_embeds"], [[0, 1], [2, 3]])
  cut = trim({"targets": 11, "images": 1, "modalities": 4})  # the limit falls inside the third
  assert len(cut["targets"]) == 9 and cut["modality_embeds"].shape == (2, 2)
  whole = trim({"targets": 64, "images": 1, "modalities": 4})
  assert len(whole["targets"]) == len(mask) and whole["modality_types"].tolist() == [0, 1, 0]
