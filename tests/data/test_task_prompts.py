"""Task prompts (SPHINX's task mix): the templates' exact strings, the label
mask of one templated example per task, batches of one task each (drawn by
rate, deterministic, checkpointable) and the shapes instruction files."""

import os

import ml_collections
import numpy as np
import pytest
import seqio
import tensorflow as tf

from kosmos_jax import errors
from kosmos_jax.data import conversation_tasks, conversations, loader, shapes, shapes_instruct
from kosmos_jax.data import task_prompts as prompts
from kosmos_jax.processing import conversation
from kosmos_jax.processing import vocab as vocab_lib

GOLDEN = {
  "vqa": "{question} Answer the question using a single word or phrase.",
  "rec": (
    "Please provide the bounding box coordinate of the region this sentence describes: {expression}"
  ),
  "reg": "Please provide a short description of the region {box}.",
  "grounded_caption": (
    "Describe the image concisely. Include the bounding box for each mentioned object."
  ),
  "caption": "Provide a one-sentence caption for the provided image.",
  "detailed_caption": "Generate a detailed description about the image.",
}
RATES = dict(vqa=1.0, rec=2.0, reg=1.0, grounded_caption=1.0)
# A word only each task's prompt has: it tells which task a packed row holds.
MARKS = dict(vqa=" single", rec=" coordinate", reg=" short", grounded_caption=" concisely")
SLOTS, SIDE = 8, 16  # the tiny model's slots; the demo's 16 x 16 location grid
MODEL = ml_collections.ConfigDict(
  dict(vision=dict(image_size=32), latent_query_num=SLOTS, text=dict(num_patches_per_side=SIDE))
)


@pytest.fixture(scope="module")
def vocab():
  return shapes.shapes_vocabulary(SIDE)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, vocab):
  """`tp_mix` on 6 training pictures, registered the way the trainer does
  (data.shapes_instruct, data.conversation_mixture)."""
  folder = str(tmp_path_factory.mktemp("instruct"))
  files = shapes_instruct.files(folder, "train")
  data = ml_collections.ConfigDict(
    dict(
      spm_model_file=vocab.sentencepiece_model_file,
      data_dir="",
      shapes_instruct=dict(directory=folder, image_size=64, num_train=6, num_validation=2),
      conversation_mixture=dict(
        name="tp_mix",
        tasks={k: dict(files=files[k], template=k, rate=r) for k, r in RATES.items()},
      ),
    )
  )
  try:
    loader.register_user_tasks(data, MODEL)
  finally:  # registered on data.spm_model_file, on files that do not exist
    for name in [n for n in seqio.TaskRegistry.names() if n.startswith("kosmos2_")]:
      seqio.TaskRegistry.remove(name)
    for name in ("kosmos2_pretrain", "kosmos2_kosmos1_pretrain"):
      seqio.MixtureRegistry.remove(name)
  return folder


def test_templates_are_data_with_exact_strings(tmp_path):
  assert prompts.load() == GOLDEN
  assert {k: prompts.field(v) for k, v in GOLDEN.items() if prompts.field(v)} == dict(
    vqa="question", rec="expression", reg="box"
  )
  rec, caption = GOLDEN["rec"], GOLDEN["grounded_caption"]
  assert prompts.fill(rec, " the red circle ") == rec.format(expression="the red circle")
  # Leading picture markers stay first; a fieldless template follows the value.
  assert prompts.fill(GOLDEN["vqa"], "<image>\nWhat colour?") == (
    "<image> What colour? Answer the question using a single word or phrase."
  )
  assert prompts.fill(caption, "") == caption
  assert prompts.fill(caption, "<image>") == "<image> " + caption
  assert prompts.fill(rec, "<image>") == ""  # nothing to fill: an empty value, dropped
  mine = tmp_path / "mine.json"
  mine.write_text('{"count": "How many {thing} are there?"}')
  assert prompts.template("count", str(mine)) == "How many {thing} are there?"
  with pytest.raises(errors.UserError, match="no task prompt named 'count'"):
    prompts.template("count")
  mine.write_text('{"two": "{a} and {b}"}')
  with pytest.raises(errors.UserError, match="at most one"):
    prompts.load(str(mine))


def _first(task: str) -> dict:
  ds = seqio.get_mixture_or_task(f"tp_mix_{task}").get_dataset(
    {"targets": 256, "images": 1}, shuffle=False
  )
  return next(ds.as_numpy_iterator())


# Picture 0 of the training split: the blue circle at [0.047, 0.203, 0.344, 0.5]
# is patch (0, 3) to (5, 7) of 16 x 16: indices 48 and 117.
CIRCLE = "<phrase>the blue circle</phrase><object><patch_index_0048><patch_index_0117></object>"
EXPECTED = {
  "vqa": (
    "Human: What shape is the blue object? Answer the question using a single word or phrase."
    " Assistant:",
    " circle",
  ),
  "rec": (
    "Human: Please provide the bounding box coordinate of the region this sentence "
    "describes: the blue circle Assistant:",
    " " + CIRCLE,
  ),
  "reg": (
    "Human: Please provide a short description of the region "
    "<object><patch_index_0048><patch_index_0117></object>. Assistant:",
    " the blue circle",
  ),
  "grounded_caption": (
    "Human: Describe the image concisely. Include the bounding box for each mentioned "
    "object. Assistant:",
    " an image of <phrase>a blue circle</phrase><object><patch_index_0048><patch_index_0117>"
    "</object> at the left, <phrase>a green triangle</phrase><object><patch_index_0162>"
    "<patch_index_0213></object> at the bottom left and <phrase>a green circle</phrase>"
    "<object><patch_index_0086><patch_index_0171></object> in the middle.",
  ),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_templated_example_and_its_label_mask(mixture, vocab, task):
  """The exact tokens and loss weights of each task's first record: the
  picture first, the templated question without loss, the answer and `</s>` with."""
  prompt, answer = EXPECTED[task]
  x = _first(task)
  picture = [vocab.tag_id("<image>"), *vocab_lib.image_slot_ids(SLOTS), vocab.tag_id("</image>")]
  asked = [vocab.bos_id, *picture, *vocab.encode(prompt)]
  said = [*vocab.encode(answer), vocab.eos_id]
  np.testing.assert_array_equal(x["targets"], asked + said)
  np.testing.assert_array_equal(x["loss_weights"], [0] * len(asked) + [1] * len(said))
  mask = [0, 0] + [1] * SLOTS + [0] * (len(asked) + len(said) - 2 - SLOTS)
  np.testing.assert_array_equal(x["image_mask"], mask)


def _rows_task(vocab, targets: np.ndarray) -> str:
  """The one task whose prompt word a packed row holds ("" if none or several)."""
  has = lambda row, ids: any(
    np.array_equal(row[i : i + len(ids)], ids) for i in range(len(row) - len(ids) + 1)
  )
  marks = {k: vocab.encode(m) for k, m in MARKS.items()}
  found = [k for k, ids in marks.items() if has(targets, ids)]
  return found[0] if len(found) == 1 else ""


def _iterator(seed: int):
  ds = loader.dataset(
    "tp_mix", "train", seq_len=128, images_per_row=3, batch_size=2, seed=seed, shuffle=False
  )  # unshuffled: a shuffle buffer would read ~1000 examples of each task first
  return iter(ds)


def _take(iterator, num: int) -> list[dict]:
  return [{k: v.numpy() for k, v in next(iterator).items()} for _ in range(num)]


def test_one_task_per_batch_by_rate_deterministic_and_checkpointable(mixture, vocab, tmp_path):
  """Every row of a batch holds the same task, tasks come by rate, and a
  second pipeline of the same seed gives the same batches, then goes on from
  where the first saved its iterator."""
  assert "tp_mix" in loader.ONE_TASK_PER_BATCH
  num, saved_at, ckpt = 120, 60, str(tmp_path / "data")
  first = _iterator(seed=3)
  batches = _take(first, saved_at)
  tf.train.Checkpoint(iterator=first).write(ckpt)
  batches += _take(first, num - saved_at)
  order = []
  for batch in batches:
    tasks = {_rows_task(vocab, row) for row in batch["targets"]}
    assert len(tasks) == 1 and "" not in tasks, tasks
    order.append(tasks.pop())
  total = sum(RATES.values())
  for task, rate in RATES.items():
    p = rate / total
    assert abs(order.count(task) - num * p) <= 4 * np.sqrt(num * p * (1 - p)), (task, order)
  second = _iterator(seed=3)
  for a, b in zip(_take(second, 5), batches):
    np.testing.assert_array_equal(a["targets"], b["targets"])
  tf.train.Checkpoint(iterator=second).read(ckpt).assert_consumed()
  for a, b in zip(_take(second, 5), batches[saved_at:]):
    np.testing.assert_array_equal(a["targets"], b["targets"])


def test_task_choices_follow_the_rates():
  rates, num = [1.0, 3.0, 0.5], 6000
  draws = np.fromiter(loader.task_choices(rates, seed=0).take(num).as_numpy_iterator(), int)
  for j, rate in enumerate(rates):
    p = rate / sum(rates)
    assert abs(np.sum(draws == j) - num * p) <= 4 * np.sqrt(num * p * (1 - p))
  again = lambda seed: list(loader.task_choices(rates, seed).take(50).as_numpy_iterator())
  assert again(0) == list(draws[:50]) and again(1) != again(0)


def test_shapes_instruct_files_are_well_formed(mixture):
  for split, pictures in (("train", 6), ("validation", 2)):
    for task, path in shapes_instruct.files(mixture, split).items():
      with open(path) as f:
        lines = f.read().splitlines()
      assert len(lines) >= pictures, (task, split)
      for number, line in enumerate(lines):
        templated = prompts.apply_to_line(line, prompts.template(task))
        record = conversations.parse_line(templated, f"{path}:{number}", os.path.dirname(path))
        assert record.problem == "", (task, line)
        assert all(os.path.exists(p) for p in record.images) and len(record.images) == 1
  row = shapes_instruct.conversations(shapes.make_example("train", 0, 64), "a.jpg")
  assert [t["value"] for t in row["rec"][0]["conversations"]] == [
    "the blue circle",
    "<phrase>the blue circle</phrase><box>",
  ]
  questions = {r["conversations"][0]["value"]: r["conversations"][1]["value"] for r in row["vqa"]}
  assert questions["What shape is the blue object?"] == "circle"
  assert questions["How many shapes are there?"] == "three"
  assert conversation.problem(row["grounded_caption"][0]["conversations"]) == "empty_value"


def test_mixture_config_mistakes_are_user_errors(vocab):
  spm = vocab.sentencepiece_model_file
  register = lambda **entry: conversation_tasks.register_mixture_from_config(entry, spm, MODEL)
  with pytest.raises(errors.UserError, match="no tasks"):
    register(name="tp_bad")
  with pytest.raises(errors.UserError, match="unknown keys"):
    register(tasks=dict(a=dict(files="x.jsonl", prompt="rec")))
  with pytest.raises(errors.UserError, match="rate must be > 0"):
    register(tasks=dict(a=dict(files="x.jsonl", template="rec", rate=0.0)))
  with pytest.raises(errors.UserError, match="no task prompt named 'recc'"):
    register(tasks=dict(a=dict(files="x.jsonl", template="recc")))
