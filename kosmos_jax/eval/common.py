"""What the evaluation tasks share: queries, datasets, skips and prediction files.

Every task module (`eval/refexp.py`, `eval/flickr_entities.py`, `eval/vqa.py`,
`eval/captions.py`, ...) is a set of plain functions over these types:

  load(split=..., num=None, **data_args) -> Dataset
      reads the files exactly as users download them; a row that does not
      parse is counted in `Dataset.skipped` (strict=True: raised, naming the
      file and the record); a malformed file raises `errors.UserError`.
  prediction(query, continuation) -> str
      what the predictions file holds for one query, from the model's
      continuation of `query.prompt` (markup kept, `</s>` and padding gone).
  write_predictions(path, dataset, predictions) / read_predictions(path, dataset)
      the field's own file format; `predictions` maps query index -> text, and
      a query the runner skipped (unreadable image) has no entry.
  score(dataset, predictions) -> dict[str, float]
      the metrics, named as the issue and the papers name them, with `count`
      (queries scored) and `skipped/<reason>` counts.

Tasks whose metrics are ratios of sums (hits / queries) also provide
`sums(dataset, predictions) -> dict[str, float]` and `from_sums(dataset, sums)`,
with `score = from_sums(dataset, sums(...))`: a multi-host run adds the hosts'
sums (`process_sum`) and never averages per-host means.
"""

import collections
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from kosmos_jax import errors


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How the model answers a task's queries (the papers' settings)."""

  num_beams: int = 1
  max_new_tokens: int = 64
  no_repeat_ngram_size: int = 0
  stop_at_newline: bool = False  # VQA: the answer ends at the first newline


@dataclasses.dataclass(frozen=True)
class Query:
  """One model call: an image and the text that follows it.

  `demonstrations` are few-shot (image, text) pairs that come first, in order.
  `image` is a file path, or an array for data made in memory (the demo).
  """

  key: str  # what the predictions file calls it: line index, image_id, question_id
  image: Any
  prompt: str
  demonstrations: tuple[tuple[Any, str], ...] = ()


@dataclasses.dataclass
class Dataset:
  """A task's split as read from its files.

  `truth` is the task's own ground truth, aligned with `queries` where it is
  per query; `skipped` counts the rows that were dropped while reading, by
  reason ("annotation does not parse", "image file missing", ...).
  """

  task: str
  split: str
  queries: list[Query]
  truth: Any
  decoding: Decoding
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  source: str = ""  # the file the queries came from, for error messages


def skip_or_raise(skipped: collections.Counter, reason: str, where: str, strict: bool) -> None:
  """Counts a bad record under `reason`, or raises naming it when `strict`."""
  if strict:
    raise errors.UserError(f"{where}: {reason}")
  skipped[reason] += 1


def skip_metrics(dataset: Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  """`skipped/<reason>` counts, with the queries that got no prediction."""
  out = {f"skipped/{reason}": float(n) for reason, n in sorted(dataset.skipped.items())}
  missing = len(dataset.queries) - sum(1 for i in predictions if 0 <= i < len(dataset.queries))
  if missing:
    out["skipped/no prediction (input skipped)"] = float(missing)
  return out


# --- The official KOSMOS-2 evaluators' `H-<i>\t<score>\t<text>` lines ------------


def write_hlines(path: str, num_queries: int, predictions: Mapping[int, str]) -> None:
  """One `H-<i>\t<score>\t<text>` line per query, in annotation order.

  The official scorers match lines by position, so every query has one; a
  query without a prediction gets score `nan` and an empty text (a miss for
  them; ours reports it as skipped).
  """
  with open(path, "w", encoding="utf-8") as f:
    for i in range(num_queries):
      text = predictions.get(i)
      if text is not None and ("\n" in text or "\t" in text):
        raise ValueError(f"prediction {i} has a newline or tab: {text!r}")
      f.write(f"H-{i}\t{'nan' if text is None else '0.0'}\t{text or ''}\n")


def read_hlines(path: str, num_queries: int) -> dict[int, str]:
  """Predictions from H-lines: lines whose first field is `H-<digits>` (the
  official scorers' rule; `S-`, `D-`, `P-` lines are ignored), matched by
  position. A file with another number of lines than queries is refused (the
  official scorer silently truncates); `nan`-scored lines are skipped queries.
  """
  texts, skipped = [], set()
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      fields = line.rstrip("\n").split("\t")
      head = fields[0]
      if "H-" not in head or not head.rsplit("-", 1)[-1].isdigit():
        continue
      if len(fields) < 3:
        raise errors.UserError(f"{path}:{lineno}: an H-line needs 3 tab-separated fields")
      try:
        if math.isnan(float(fields[1])):
          skipped.add(len(texts))
      except ValueError:
        raise errors.UserError(f"{path}:{lineno}: score {fields[1]!r} is not a number") from None
      texts.append("\t".join(fields[2:]))
  if len(texts) != num_queries:
    raise errors.UserError(
      f"{path}: {len(texts)} H-lines for {num_queries} queries; the predictions are "
      "for another task or split, or incomplete"
    )
  return {i: t for i, t in enumerate(texts) if i not in skipped}


# --- COCO-style JSON results: `[{"<id field>": id, "<text field>": text}, ...]` ---------


def _json_id(key: str) -> int | str:
  # question_id, image_id and ref_id are numbers in the official files.
  return int(key) if key.isdigit() else key


def write_json_results(
  path: str, dataset: Dataset, predictions: Mapping[int, str], id_field: str, text_field: str
) -> None:
  """One row per query that has a prediction, in query order (a skipped
  query has no row: the official scorers then refuse the file as incomplete)."""
  rows = [
    {id_field: _json_id(q.key), text_field: predictions[i]}
    for i, q in enumerate(dataset.queries)
    if i in predictions
  ]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(rows, f, ensure_ascii=False)


def read_json_results(
  path: str,
  dataset: Dataset,
  id_field: str,
  text_field: str,
  known_ids: frozenset[str],
  partial: bool = False,
) -> dict[int, str]:
  """Query index -> text from a JSON results file.

  `known_ids` are every id of the split, those that `load` dropped (`num`,
  bad records) included: their rows are ignored. An id outside them (results
  for another split or task), a repeated id or a malformed row is an error;
  so is a file that lacks some query's id, unless `partial`.
  """
  try:
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: not a JSON results file ({e})") from None
  if not isinstance(rows, list):
    raise errors.UserError(f"{path}: a results file is a JSON list of objects")
  index = {q.key: i for i, q in enumerate(dataset.queries)}
  out, seen = {}, set()
  for n, row in enumerate(rows):
    ok = isinstance(row, dict) and isinstance(row.get(text_field), str)
    key = row.get(id_field) if ok else None
    if not isinstance(key, (int, str)) or isinstance(key, bool):
      raise errors.UserError(
        f"{path}: row {n} is not {{{id_field!r}: id, {text_field!r}: text}}: {row!r:.200}"
      )
    key = str(key)
    if key not in known_ids:
      raise errors.UserError(
        f"{path}: row {n}: {id_field} {key} is not in the {dataset.split} split of "
        f"{dataset.source or dataset.task}; these are results for another split or task"
      )
    if key in seen:
      raise errors.UserError(f"{path}: row {n}: {id_field} {key} appears twice")
    seen.add(key)
    if key in index:
      out[index[key]] = row[text_field]
  if len(out) < len(dataset.queries) and not partial:
    raise errors.UserError(
      f"{path}: results for {len(out)} of the {len(dataset.queries)} queries; the file is "
      "incomplete (partial=True scores the queries it has)"
    )
  return out
