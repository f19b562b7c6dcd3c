"""VQAv2 open-ended answers, scored as the official VQA evaluation does.

The model reads the image then `Question: {question} Answer:` and answers
greedily; the answer is its continuation up to the first newline, without
markup (KOSMOS-1 4.1.1, KOSMOS-2 4.3.1). The accuracy is GT-Vision-Lab/VQA's
`vqaEval.py` at HEAD (reference/evaluation.md 6):

* the prediction and each of the (10) ground-truth answers lose newlines and
  tabs and are stripped;
* only when the ground-truth answers are not all the same are they and the
  prediction normalised (punctuation, then lower case, number words, articles,
  contractions); when they agree nothing else is done, not even lower-casing;
* a question scores the mean, over its answers, of min(1, matches among the
  other answers / 3).

`accuracy` is the mean over questions x 100, unrounded (the official prints it
rounded to 2 decimals). test-dev and test-std have no public annotations: their
results file is for the evaluation server, and `score` says there is nothing to
score.

Few-shot (`shots=K`, KOSMOS-1 4.1.1): K questions of another split, the train
split as a rule (`train_questions`, `train_annotations`: the same files for
train2014), come first, each its image then
`Question: {question} Answer: {multiple_choice_answer}` (the papers show the
layout only in a figure, reference/evaluation.md 7, UNVERIFIED). They are drawn
per query by `fewshot.DemonstrationPool`, seeded with `seed` and the question
id, so a query's demonstrations do not depend on `num` or on the other
queries; no demonstration shows the query's own image.
"""

import collections
import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence

from kosmos_jax import errors
from kosmos_jax.eval import common, fewshot
from kosmos_jax.processing import grounding

DECODING = common.Decoding(num_beams=1, max_new_tokens=10, stop_at_newline=True)
# The official answer types; `sums` always has them so every host has the same keys.
ANSWER_TYPES = ("yes/no", "number", "other")

# The official normalisation tables (vqaEval.py @ HEAD), as data.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-")
_PUNCTUATION += (">", "<", "@", "`", ",", "?", "!")
_NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5")
_NUMBERS |= dict(six="6", seven="7", eight="8", nine="9", ten="10")
_ARTICLES = frozenset(("a", "an", "the"))
# `word replacement` pairs. Quirks kept: "somebody'd" -> "somebodyd", no-op
# entries, and capitalised keys ("Im") that never match the lower-cased words.
_CONTRACTION_PAIRS = """
aint ain't arent aren't cant can't couldve could've couldnt couldn't
couldn'tve couldn't've couldnt've couldn't've didnt didn't doesnt doesn't dont don't
hadnt hadn't hadnt've hadn't've hadn'tve hadn't've hasnt hasn't havent haven't hed he'd
hed've he'd've he'dve he'd've hes he's howd how'd howll how'll hows how's Id've I'd've
I'dve I'd've Im I'm Ive I've isnt isn't itd it'd itd've it'd've it'dve it'd've itll it'll
let's let's maam ma'am mightnt mightn't mightnt've mightn't've mightn'tve mightn't've
mightve might've mustnt mustn't mustve must've neednt needn't notve not've oclock o'clock
oughtnt oughtn't ow's'at 'ow's'at 'ows'at 'ow's'at 'ow'sat 'ow's'at shant shan't
shed've she'd've she'dve she'd've she's she's shouldve should've shouldnt shouldn't
shouldnt've shouldn't've shouldn'tve shouldn't've somebody'd somebodyd
somebodyd've somebody'd've somebody'dve somebody'd've somebodyll somebody'll
somebodys somebody's someoned someone'd someoned've someone'd've someone'dve someone'd've
someonell someone'll someones someone's somethingd something'd
somethingd've something'd've something'dve something'd've somethingll something'll
thats that's thered there'd thered've there'd've there'dve there'd've therere there're
theres there's theyd they'd theyd've they'd've they'dve they'd've theyll they'll
theyre they're theyve they've twas 'twas wasnt wasn't wed've we'd've we'dve we'd've
weve we've werent weren't whatll what'll whatre what're whats what's whatve what've
whens when's whered where'd wheres where's whereve where've whod who'd whod've who'd've
who'dve who'd've wholl who'll whos who's whove who've whyll why'll whyre why're
whys why's wont won't wouldve would've wouldnt wouldn't wouldnt've wouldn't've
wouldn'tve wouldn't've yall y'all yall'll y'all'll y'allll y'all'll yall'd've y'all'd've
y'alld've y'all'd've y'all'dve y'all'd've youd you'd youd've you'd've you'dve you'd've
youll you'll youre you're youve you've
""".split()
_CONTRACTIONS = dict(zip(_CONTRACTION_PAIRS[::2], _CONTRACTION_PAIRS[1::2]))
# The official scorer ran on Python 2, where `\d` is an ASCII digit.
_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
# The official regex, "(?!<=\d)(\.)(?!\d)", mistypes its lookbehind as a
# lookahead that always holds at a period: every period not followed by a digit
# goes. It passes re.UNICODE (32) where the count goes, so at most 32 go.
_PERIOD = re.compile(r"\.(?![0-9])")
_PERIOD_COUNT = 32


@dataclasses.dataclass(frozen=True)
class Truth:
  """`annotations[i]`: query i's annotation record (None: the split has none);
  `ids`: every question id of the split, for refusing another split's results."""

  annotations: list[dict | None]
  ids: frozenset[str]


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`: a mark next to a space (anywhere in
  the text), or any mark in a text with a digit-comma-digit, is deleted;
  otherwise it becomes a space. Then periods go (see `_PERIOD`)."""
  out = text
  glue = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in _PUNCTUATION:
    # The test reads the original text, not the one being rewritten.
    out = out.replace(p, "" if glue or p + " " in text or " " + p in text else " ")
  return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`: lower case, number words to digits,
  articles dropped, then contractions restored, one space between words."""
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize(answer: str) -> str:
  return process_digit_article(process_punctuation(answer))


def _clean(answer: str) -> str:
  return answer.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, answers: Sequence[Mapping]) -> float:
  """One question's accuracy in [0, 1] against its answer records
  (`{"answer", "answer_confidence", "answer_id"}`)."""
  truths = [_clean(a["answer"]) for a in answers]
  prediction = _clean(prediction)
  if len(set(truths)) > 1:
    truths = [normalize(t) for t in truths]
    prediction = normalize(prediction)
  records = [{**a, "answer": t} for a, t in zip(answers, truths)]
  total = 0.0
  for record in records:
    # "The others" are the records unequal to this one, as in the official
    # code: with unique answer_ids, exactly one is left out.
    matches = sum(other["answer"] == prediction for other in records if other != record)
    total += min(1.0, matches / 3)
  return total / len(records)


# --- Loading -------------------------------------------------------------------


def _read_json(path: str, key: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: cannot read the VQA file ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise errors.UserError(f"{path}: not a VQA file (no {key!r} list)")
  return data


def _image_folder(subtype: str) -> str:
  # test-dev is a subset of test2015, whose images it uses.
  return re.sub(r"^test-dev", "test", subtype)


def _answers_parse(ann) -> bool:
  answers = ann.get("answers") if isinstance(ann, dict) else None
  return (
    isinstance(answers, list)
    and len(answers) > 0
    and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)
    and isinstance(ann.get("answer_type"), str)
  )


def _annotations_by_question(path: str, subtype: str, questions: str, strict: bool, skipped):
  """question_id -> its annotation record, or where the record that does not parse is."""
  data = _read_json(path, "annotations")
  if data.get("data_subtype", subtype) != subtype:
    raise errors.UserError(
      f"{path}: annotations for {data['data_subtype']}, but {questions} is {subtype}"
    )
  by_id = {}
  for n, ann in enumerate(data["annotations"]):
    qid = ann.get("question_id") if isinstance(ann, dict) else None
    if isinstance(qid, int):
      # A bad annotation counts when its question is read (`num` may leave it out).
      by_id[qid] = ann if _answers_parse(ann) else f"{path}: record {n}"
    else:
      common.skip_or_raise(skipped, "annotation does not parse", f"{path}: record {n}", strict)
  return by_id


def _demonstration_pool(
  train_questions: str, train_annotations: str, image_dir: str
) -> fewshot.DemonstrationPool:
  """Each train question that parses and has an annotation with a
  `multiple_choice_answer`, with its image, in the questions file's order."""
  data = _read_json(train_questions, "questions")
  subtype = data.get("data_subtype")
  if not isinstance(subtype, str):
    raise errors.UserError(f"{train_questions}: no data_subtype (it names the images' files)")
  answers = _annotations_by_question(
    train_annotations, subtype, train_questions, False, collections.Counter()
  )
  folder = _image_folder(subtype)
  pairs, seen = [], set()
  for q in data["questions"]:
    qid = q.get("question_id") if isinstance(q, dict) else None
    ann = answers.get(qid) if isinstance(qid, int) else None
    if (
      qid in seen
      or not isinstance(ann, dict)
      or not isinstance(ann.get("multiple_choice_answer"), str)
      or not isinstance(q.get("image_id"), int)
      or not isinstance(q.get("question"), str)
    ):
      continue
    seen.add(qid)
    image = os.path.join(image_dir, f"COCO_{folder}_{q['image_id']:012d}.jpg")
    pairs.append((image, f"Question: {q['question']} Answer: {ann['multiple_choice_answer']}"))
  return fewshot.DemonstrationPool(pairs, train_questions)


def load(
  split: str,
  num: int | None = None,
  *,
  questions: str,
  annotations: str | None = None,
  image_dir: str,
  strict: bool = False,
  shots: int = 0,
  seed: int = 0,
  train_questions: str | None = None,
  train_annotations: str | None = None,
) -> common.Dataset:
  """The questions of `v2_OpenEnded_mscoco_<split>_questions.json`.

  Args:
    split: the files' `data_subtype` ("val2014", "test-dev2015"), or it without
      the year ("val", "test-dev").
    num: only the first `num` questions of the file.
    questions: the questions file, as downloaded.
    annotations: `v2_mscoco_<split>_annotations.json`; None for test-dev and
      test, which have none (then `score` has nothing to score).
    image_dir: the folder of `COCO_<folder>_<image_id:012d>.jpg`, where folder
      is the subtype (test-dev's images are test2015's). With `shots`, the
      demonstrations' images are looked for in the same folder, by the same
      rule with the train files' subtype (`COCO_train2014_...jpg`): COCO's
      names never clash, so one folder holds both (links to the val2014 and
      train2014 files, say).
    strict: a record that does not parse is an error, not a skip.
    shots: demonstrations per question, from `train_questions`.
    seed: draws the demonstrations (with each question id).
    train_questions: with `shots`, the questions file the demonstrations come
      from (`v2_OpenEnded_mscoco_train2014_questions.json`). A question that
      does not parse, or whose annotation has no `multiple_choice_answer`, is
      left out of the draw.
    train_annotations: with `shots`, its annotations file (the answers).
  """
  fewshot.check_few_shot(shots, seed)
  pool = None
  if shots:
    missing = [
      name
      for name, path in (
        ("train_questions", train_questions),
        ("train_annotations", train_annotations),
      )
      if path is None
    ]
    if missing:
      raise errors.UserError(
        f"shots={shots} needs {' and '.join(missing)}: the demonstrations' questions and "
        "annotations files (train2014's)"
      )
  data = _read_json(questions, "questions")
  subtype = data.get("data_subtype", split)
  if split not in (subtype, subtype.rstrip("0123456789")):
    raise errors.UserError(f"{questions}: questions of {subtype}, not of split {split!r}")
  if shots:
    pool = _demonstration_pool(train_questions, train_annotations, image_dir)
    if len(pool) < shots:
      raise errors.UserError(f"{train_questions}: {len(pool)} answered questions for shots={shots}")
  skipped = collections.Counter()
  truth = None
  if annotations is not None:
    truth = _annotations_by_question(annotations, subtype, questions, strict, skipped)
  records = data["questions"]
  ids = frozenset(
    str(q["question_id"]) for q in records if isinstance(q, dict) and "question_id" in q
  )
  queries, per_query, seen = [], [], set()
  folder = _image_folder(subtype)
  for n, q in enumerate(records[:num] if num is not None else records):
    where = f"{questions}: record {n}"
    qid = q.get("question_id") if isinstance(q, dict) else None
    if not (
      isinstance(qid, int)
      and isinstance(q.get("image_id"), int)
      and isinstance(q.get("question"), str)
    ):
      common.skip_or_raise(skipped, "question does not parse", where, strict)
      continue
    if qid in seen:
      common.skip_or_raise(skipped, "question_id repeated", where, strict)
      continue
    if truth is not None and not isinstance(truth.get(qid), dict):
      bad = truth.get(qid)  # where the unparsable annotation is, or None
      reason = "question has no annotation" if bad is None else "annotation does not parse"
      common.skip_or_raise(skipped, reason, bad or where, strict)
      continue
    seen.add(qid)
    image = os.path.join(image_dir, f"COCO_{folder}_{q['image_id']:012d}.jpg")
    shown = pool.draw(shots, seed, str(qid), image) if pool is not None else ()
    queries.append(common.Query(str(qid), image, f"Question: {q['question']} Answer:", shown))
    per_query.append(None if truth is None else truth[qid])
  return common.Dataset(
    "vqav2", split, queries, Truth(per_query, ids), DECODING, skipped, source=questions
  )


# --- Predictions ---------------------------------------------------------------


def prediction(query: common.Query, continuation: str) -> str:
  """The answer: the continuation up to its first newline, markup removed."""
  del query
  return grounding.clean_text_and_extract_entities(continuation.split("\n", 1)[0])[0]


def write_predictions(path: str, dataset: common.Dataset, predictions: Mapping[int, str]) -> None:
  """The official results file, `[{"question_id", "answer"}]`."""
  common.write_json_results(path, dataset, predictions, "question_id", "answer")


def read_predictions(path: str, dataset: common.Dataset, partial: bool = False) -> dict[int, str]:
  """See `common.read_json_results`."""
  return common.read_json_results(
    path, dataset, "question_id", "answer", dataset.truth.ids, partial
  )


# --- Scores --------------------------------------------------------------------


def _types(dataset: common.Dataset) -> list[str]:
  found = {a["answer_type"] for a in dataset.truth.annotations if a is not None}
  return list(ANSWER_TYPES) + sorted(found - set(ANSWER_TYPES))


def sums(dataset: common.Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  """Accuracy sums and counts, overall and per answer type (the same keys on
  every host, which `from_sums` turns into means after they are added)."""
  out = {"accuracy_sum": 0.0, "count": 0.0, "predicted": 0.0}
  for t in _types(dataset):
    out[f"accuracy_sum/{t}"] = out[f"count/{t}"] = 0.0
  for i, text in predictions.items():
    if not 0 <= i < len(dataset.queries):
      continue
    out["predicted"] += 1
    ann = dataset.truth.annotations[i]
    if ann is None:
      continue
    acc = question_accuracy(text, ann["answers"])
    for suffix in ("", "/" + ann["answer_type"]):
      out["accuracy_sum" + suffix] += acc
      out["count" + suffix] += 1
  return out


def from_sums(dataset: common.Dataset, totals: Mapping[str, float]) -> dict[str, float]:
  """The metrics from `sums` added over the hosts."""
  out = {"count": totals["count"]}
  if totals["count"]:
    out["accuracy"] = 100 * totals["accuracy_sum"] / totals["count"]
  for t in _types(dataset):
    if totals[f"count/{t}"]:
      out[f"accuracy/{t}"] = 100 * totals[f"accuracy_sum/{t}"] / totals[f"count/{t}"]
      out[f"count/{t}"] = totals[f"count/{t}"]
  unscored = totals["predicted"] - totals["count"]
  if unscored:
    out["unscored/no annotations (score on the evaluation server)"] = unscored
    logging.warning(
      "%s %s: %d answers have no annotations to score them against; submit the results "
      "file to the evaluation server",
      dataset.task,
      dataset.split,
      unscored,
    )
  # skip_metrics counts the predictions' indices; any `predicted` of them will do.
  out.update(common.skip_metrics(dataset, range(int(totals["predicted"]))))
  return out


def score(dataset: common.Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  """`accuracy` (x100), `accuracy/<answer type>`, `count`, skips."""
  return from_sums(dataset, sums(dataset, predictions))
