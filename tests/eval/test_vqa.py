"""VQAv2: the official files, the official accuracy with its quirks, results files."""

import json

import pytest

from kosmos_jax import errors
from kosmos_jax.eval import common, vqa


def _answers(*texts):
  return [
    {"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)
  ]


def _write(tmp_path, subtype, questions, annotations=None):
  """The two files as downloaded from the VQA site."""
  header = {"info": {"description": "VQA v2"}, "license": {"name": "CC BY 4.0"}}
  header |= {"data_type": "mscoco", "data_subtype": subtype}
  q = tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
  q.write_text(json.dumps(header | {"task_type": "Open-Ended", "questions": questions}))
  if annotations is None:
    return str(q), None
  a = tmp_path / f"v2_mscoco_{subtype}_annotations.json"
  a.write_text(json.dumps(header | {"annotations": annotations}))
  return str(q), str(a)


QUESTIONS = [
  {"image_id": 42, "question": "Is it raining?", "question_id": 420},
  {"image_id": 42, "question": "How many dogs?", "question_id": 421},
  {"image_id": 7, "question": "What color is the car?", "question_id": 70},
]


def _annotation(question_id, image_id, question_type, answer_type, answers):
  return {
    "question_id": question_id,
    "image_id": image_id,
    "question_type": question_type,
    "answer_type": answer_type,
    "multiple_choice_answer": answers[0],
    "answers": _answers(*answers),
  }


ANNOTATIONS = [
  _annotation(420, 42, "is it", "yes/no", ["yes"] * 8 + ["no"] * 2),
  _annotation(421, 42, "how many", "number", ["2"] * 2 + ["3"] * 8),
  _annotation(70, 7, "what color", "other", ["red"] * 10),
]


@pytest.fixture
def val(tmp_path):
  q, a = _write(tmp_path, "val2014", QUESTIONS, ANNOTATIONS)
  return vqa.load("val2014", questions=q, annotations=a, image_dir="/coco/val2014")


def test_load_reads_the_official_files(val):
  assert [q.key for q in val.queries] == ["420", "421", "70"]
  assert val.queries[0].image == "/coco/val2014/COCO_val2014_000000000042.jpg"
  assert val.queries[1].prompt == "Question: How many dogs? Answer:"
  assert val.decoding.num_beams == 1 and val.decoding.stop_at_newline
  assert val.decoding.max_new_tokens == 10
  assert not val.skipped


def test_split_may_omit_the_year_but_must_match(tmp_path):
  q, a = _write(tmp_path, "val2014", QUESTIONS, ANNOTATIONS)
  assert len(vqa.load("val", questions=q, annotations=a, image_dir="i").queries) == 3
  with pytest.raises(errors.UserError, match="val2014, not of split 'test-dev'"):
    vqa.load("test-dev", questions=q, image_dir="i")


@pytest.mark.parametrize(
  "prediction, truths, accuracy",
  [
    # The 10 answers agree: no normalisation at all, not even lower case.
    ("yes", ["Yes"] * 10, 0.0),
    ("Yes", ["Yes"] * 10, 1.0),
    ("Yes", ["Yes\n"] + ["Yes"] * 9, 1.0),  # newlines and tabs go before the comparison
    # Leave-one-out: mean over the 10 answers of min(1, matches among the other 9 / 3).
    ("a", ["a"] + ["b"] * 9, (9 * 1 / 3 + 0) / 10),
    ("a", ["a"] * 2 + ["b"] * 8, (8 * 2 / 3 + 2 * 1 / 3) / 10),  # 0.6
    ("a", ["a"] * 3 + ["b"] * 7, (7 * 1 + 3 * 2 / 3) / 10),  # 0.9
    ("a", ["a"] * 4 + ["b"] * 6, 1.0),
    ("c", ["a"] * 4 + ["b"] * 6, 0.0),
    # They disagree: both sides are normalised.
    ("Two Dogs.", ["2 dogs"] * 4 + ["dogs"] * 6, 1.0),  # number word, case, final period
    ("the red car", ["red car"] * 3 + ["a blue car"] * 7, 0.9),  # articles
    ("dont know", ["don't know"] * 4 + ["no"] * 6, 1.0),  # contractions table
    ("yes!", ["yes"] * 4 + ["no"] * 6, 1.0),  # "!" becomes a space
    ("hot - dog", ["hot dog"] * 4 + ["no"] * 6, 1.0),  # "-" next to a space is deleted
    ("hot-dog", ["hot dog"] * 4 + ["no"] * 6, 1.0),  # "-" elsewhere becomes a space
    ("1,000", ["1000"] * 4 + ["no"] * 6, 1.0),  # digit,digit: every mark is deleted
    ("red,blue", ["red blue"] * 4 + ["no"] * 6, 1.0),
    ("3.5", ["35"] * 4 + ["no"] * 6, 0.0),  # a period before a digit stays
    ("a.m", ["am"] * 4 + ["no"] * 6, 1.0),  # any other period goes, inside words too
    ("None", ["0"] * 4 + ["no"] * 6, 1.0),
  ],
)
def test_question_accuracy(prediction, truths, accuracy):
  assert vqa.question_accuracy(prediction, _answers(*truths)) == pytest.approx(accuracy)


def test_normalisation_quirks():
  # The official period regex removes at most 32 periods (re.UNICODE passed as count).
  assert vqa.process_punctuation("a." * 40) == "a" * 33 + ".a" * 7 + "."
  # Capitalised table keys never match the lower-cased words.
  assert vqa.process_digit_article("Im an IM") == "im im"
  assert vqa.process_digit_article("The THREE Isnt") == "3 isn't"
  assert vqa.normalize("  (a) dog ") == "dog"


def test_score_by_answer_type(val):
  predictions = {0: "yes", 1: "2", 2: "Red"}
  yes_no = (8 * 1 + 2 * 1) / 10  # every leave-one-out set keeps >= 7 "yes"
  number = (8 * 2 / 3 + 2 * 1 / 3) / 10
  metrics = vqa.score(val, predictions)
  assert metrics["accuracy/yes/no"] == pytest.approx(100 * yes_no)
  assert metrics["accuracy/number"] == pytest.approx(100 * number)
  assert metrics["accuracy/other"] == 0.0  # "Red" vs ten "red": no lower-casing
  assert metrics["accuracy"] == pytest.approx(100 * (yes_no + number) / 3)
  assert metrics["count"] == 3 and metrics["count/number"] == 1


def test_sums_add_over_hosts(val):
  predictions = {0: "no", 1: "3", 2: "red"}
  halves = [vqa.sums(val, {0: "no"}), vqa.sums(val, {1: "3", 2: "red"})]
  assert halves[0].keys() == halves[1].keys()  # the same keys on every host
  added = {k: halves[0][k] + halves[1][k] for k in halves[0]}
  assert vqa.from_sums(val, added) == pytest.approx(vqa.score(val, predictions))
  partial = vqa.score(val, {0: "no"})
  assert partial["count"] == 1 and partial["skipped/no prediction (input skipped)"] == 2


def test_prediction_is_the_first_line_without_markup():
  q = common.Query("1", "x.jpg", "Question: How many? Answer:")
  assert vqa.prediction(q, " two<phrase> dogs</phrase>\nQuestion: x") == "two dogs"
  assert vqa.prediction(q, "\nyes") == ""


def test_results_file_round_trip_and_refusals(val, tmp_path):
  path = tmp_path / "results.json"
  vqa.write_predictions(str(path), val, {0: "yes", 1: "2", 2: "red"})
  rows = json.loads(path.read_text())
  assert rows[0] == {"question_id": 420, "answer": "yes"}
  assert vqa.read_predictions(str(path), val) == {0: "yes", 1: "2", 2: "red"}

  path.write_text(json.dumps(rows + [{"question_id": 99999, "answer": "x"}]))
  with pytest.raises(errors.UserError, match=r"results.json.*99999 is not in the val2014 split"):
    vqa.read_predictions(str(path), val)
  path.write_text(json.dumps(rows + rows[:1]))
  with pytest.raises(errors.UserError, match="appears twice"):
    vqa.read_predictions(str(path), val)
  path.write_text(json.dumps(rows[:2]))
  with pytest.raises(errors.UserError, match="results for 2 of the 3 queries"):
    vqa.read_predictions(str(path), val)
  assert vqa.read_predictions(str(path), val, partial=True) == {0: "yes", 1: "2"}
  path.write_text(json.dumps([{"question_id": 420}]))
  with pytest.raises(errors.UserError, match="row 0"):
    vqa.read_predictions(str(path), val)


def test_num_reads_the_first_questions_and_accepts_the_others_results(tmp_path):
  q, a = _write(tmp_path, "val2014", QUESTIONS, ANNOTATIONS)
  first = vqa.load("val", 1, questions=q, annotations=a, image_dir="i")
  path = tmp_path / "results.json"
  path.write_text(json.dumps([{"question_id": i, "answer": "yes"} for i in (420, 421, 70)]))
  assert vqa.read_predictions(str(path), first) == {0: "yes"}


def test_test_dev_has_nothing_to_score(tmp_path):
  q, _ = _write(tmp_path, "test-dev2015", QUESTIONS[:2])
  test_dev = vqa.load("test-dev", questions=q, image_dir="/coco/test2015")
  assert test_dev.queries[0].image == "/coco/test2015/COCO_test2015_000000000042.jpg"
  metrics = vqa.score(test_dev, {0: "yes", 1: "2"})
  assert metrics["count"] == 0 and "accuracy" not in metrics
  assert metrics["unscored/no annotations (score on the evaluation server)"] == 2
  vqa.write_predictions(str(tmp_path / "r.json"), test_dev, {0: "yes", 1: "2"})
  assert vqa.read_predictions(str(tmp_path / "r.json"), test_dev) == {0: "yes", 1: "2"}


def test_bad_records_are_counted_or_raised(tmp_path):
  questions = QUESTIONS + [
    {"image_id": "x", "question": "?", "question_id": 1},  # image_id not a number
    {"image_id": 5, "question": "Why?", "question_id": 2},  # no annotation
    {"image_id": 5, "question": "Who?", "question_id": 3},  # bad annotation
    QUESTIONS[0],  # repeated
  ]
  annotations = ANNOTATIONS + [
    {"question_id": 3, "answer_type": "other", "answers": "yes"},
    {"answers": []},  # no question id
  ]
  q, a = _write(tmp_path, "val2014", questions, annotations)
  data = vqa.load("val2014", questions=q, annotations=a, image_dir="i")
  assert len(data.queries) == 3
  assert dict(data.skipped) == {
    "question does not parse": 1,
    "question has no annotation": 1,
    "annotation does not parse": 2,
    "question_id repeated": 1,
  }
  assert vqa.score(data, {})["skipped/question has no annotation"] == 1
  with pytest.raises(errors.UserError, match=r"annotations.json: record 4: annotation does not"):
    vqa.load("val2014", questions=q, annotations=a, image_dir="i", strict=True)
  q, a = _write(tmp_path, "val2014", questions, ANNOTATIONS)
  with pytest.raises(errors.UserError, match=r"questions.json: record 3: question does not parse"):
    vqa.load("val2014", questions=q, annotations=a, image_dir="i", strict=True)


def test_malformed_files_are_refused(tmp_path):
  bad = tmp_path / "q.json"
  bad.write_text("{")
  with pytest.raises(errors.UserError, match="q.json: cannot read"):
    vqa.load("val", questions=str(bad), image_dir="i")
  q, _ = _write(tmp_path, "val2014", QUESTIONS)
  (tmp_path / "test").mkdir()
  _, a = _write(tmp_path / "test", "test2015", [], ANNOTATIONS)
  with pytest.raises(errors.UserError, match="annotations for test2015"):
    vqa.load("val", questions=q, annotations=a, image_dir="i")


# --- Few-shot ----------------------------------------------------------------------

TRAIN_QUESTIONS = [
  {"image_id": 9, "question": "Is it sunny?", "question_id": 90},
  {"image_id": 9, "question": "What is in the sky?", "question_id": 91},
  {"image_id": 8, "question": "How many cats?", "question_id": 80},
  {"image_id": 6, "question": "Why?", "question_id": 60},  # no multiple_choice_answer
]
TRAIN_ANNOTATIONS = [
  _annotation(90, 9, "is it", "yes/no", ["yes"] * 10),
  _annotation(91, 9, "what is", "other", ["clouds"] * 6 + ["sun"] * 4),
  _annotation(80, 8, "how many", "number", ["2"] * 10),
  {**_annotation(60, 6, "why", "other", ["because"] * 10), "multiple_choice_answer": None},
]
IMAGE_9, IMAGE_8 = (f"/coco/COCO_train2014_{i:012d}.jpg" for i in (9, 8))
TRAIN_PAIRS = {
  (IMAGE_9, "Question: Is it sunny? Answer: yes"),
  (IMAGE_9, "Question: What is in the sky? Answer: clouds"),
  (IMAGE_8, "Question: How many cats? Answer: 2"),
}


@pytest.fixture
def files(tmp_path):
  """The val files and the train files (the demonstrations')."""
  val = _write(tmp_path, "val2014", QUESTIONS, ANNOTATIONS)
  train = _write(tmp_path, "train2014", TRAIN_QUESTIONS, TRAIN_ANNOTATIONS)
  return val, train


def test_few_shot_demonstrations_are_train_questions_drawn_per_query(files):
  (q, a), (tq, ta) = files

  def load(num=None, **kwargs):
    return vqa.load(
      "val",
      num,
      questions=q,
      annotations=a,
      image_dir="/coco",
      train_questions=tq,
      train_annotations=ta,
      **kwargs,
    )

  data = load(shots=2, seed=0)
  assert [x.key for x in data.queries] == ["420", "421", "70"]
  assert data.queries[0].image == "/coco/COCO_val2014_000000000042.jpg"
  for x in data.queries:
    assert len(x.demonstrations) == 2 and len(set(x.demonstrations)) == 2
    assert set(x.demonstrations) <= TRAIN_PAIRS
  assert load(shots=2, seed=0).queries == data.queries  # deterministic
  assert load(num=1, shots=2, seed=0).queries == data.queries[:1]  # per query, not per run
  assert load(shots=2, seed=1).queries != data.queries
  assert all(x.demonstrations == () for x in load().queries)
  assert load(shots=0, seed=3).queries == load().queries


def test_few_shot_never_shows_the_querys_own_image(files):
  _, (tq, ta) = files

  def load(shots):
    return vqa.load(
      "train",
      questions=tq,
      annotations=ta,
      image_dir="/coco",
      shots=shots,
      train_questions=tq,
      train_annotations=ta,
    )

  data = load(1)
  assert [x.key for x in data.queries] == ["90", "91", "80", "60"]
  # 90 and 91 share image 9: their one demonstration can only be 80's.
  assert [x.demonstrations for x in data.queries[:2]] == [
    ((IMAGE_8, "Question: How many cats? Answer: 2"),)
  ] * 2
  assert data.queries[2].demonstrations[0][0] == IMAGE_9
  with pytest.raises(errors.UserError, match="1 demonstrations other than query 90's image"):
    load(2)


def test_bad_few_shot_arguments_are_refused(files):
  (q, a), (tq, ta) = files

  def load(**kwargs):
    return vqa.load("val", questions=q, annotations=a, image_dir="/coco", **kwargs)

  with pytest.raises(errors.UserError, match="shots=1 needs train_questions and train_annotations"):
    load(shots=1)
  with pytest.raises(errors.UserError, match="shots=1 needs train_annotations:"):
    load(shots=1, train_questions=tq)
  # 60's annotation has no multiple_choice_answer: 3 questions to draw from.
  with pytest.raises(errors.UserError, match="3 answered questions for shots=4"):
    load(shots=4, train_questions=tq, train_annotations=ta)
  with pytest.raises(errors.UserError, match="annotations for val2014, but .* is train2014"):
    load(shots=1, train_questions=tq, train_annotations=a)
  with pytest.raises(errors.UserError, match="shots must be an integer >= 0, got -1"):
    load(shots=-1)
  with pytest.raises(errors.UserError, match="seed must be an integer >= 0, got -1"):
    load(shots=1, seed=-1, train_questions=tq, train_annotations=ta)
