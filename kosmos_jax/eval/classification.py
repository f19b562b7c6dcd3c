"""KOSMOS-1's zero-shot image classification (`imagenet_zeroshot`, reference/evaluation.md 7).

The image is followed by the prompt `The photo of the`, and an answer is
right when it is exactly the image's class name. Two protocols:

  constrained    every class name is scored by the log-likelihood of its
                 tokens after the prompt (`classify`, through
                 models/scoring.py: the image and prompt run once, the names
                 in batches against their KV cache); the best name is the
                 answer (`top1`), the best five give `top5`. This is the
                 pattern of big_vision's cappa scoring classifier.
  unconstrained  free generation, beam 2 (`DECODING`), exact match with the
                 class name (`top1_open`): what the evaluation runner does
                 with `prediction`; `classify(open_ended=True)` does both.

Scoring choices (the reference is silent on them):
  * A name continues the prompt as the tokens of `The photo of the <name>`
    after those of `The photo of the`, i.e. with its leading space, as the
    model reads the name in a sentence.
  * `</s>` ends every name. Without an end, a name that starts another
    ("tiger" / "tiger shark", both ImageNet classes) always outscores it:
    the longer name only adds negative log-probabilities.
  * Summed log-likelihood, no length normalisation: the probability that
    the model says exactly this name and stops, which is what the exact
    match of the unconstrained protocol asks for.
  * Names that occur twice (the first WordNet lemma gives "crane" for the
    bird and the machine, "maillot" twice) are scored once, and an answer
    counts by name, so either class accepts it; pass `class_names` with
    distinct names to avoid that.

Accepted data (`load`): `image_dir` holds one folder per class, images
(.jpg, .jpeg, .png, ...) inside; nested folders and dot files are ignored,
other files are skipped ("not an image file"). Class names come from, in
order of precedence:
  * `class_names`: a text file, one name per line, line i naming class i;
  * `synset_map`: `LOC_synset_mapping.txt` of the ImageNet download, lines
    `n01440764 tench, Tinca tinca`; the name is the text before the first
    comma, the classes (and the candidates) are every line of the map in
    its order, whether or not a folder holds their images; a folder that is
    not in the map is skipped;
  * else the folder names, underscores read as spaces, in sorted order.
The flat ImageNet val folder (`ILSVRC2012_val_*.JPEG` with a label file) is
not read: sort it into synset folders first (as the usual `valprep.sh`
does). Queries are ordered by file name, then folder: for ImageNet val that
is the official order, so the first `num` images span the classes.

Predictions (`classify`, `read_predictions`) map query index -> either
`{"top5": [names, best first], "generation": text (optional)}` or, for the
unconstrained protocol alone, the generated text. The predictions file is a
JSON list in query order, one entry per answered image (no standard format
exists): `{"image": "<folder>/<file>", "label": name, "prediction": top-1
name or null, "top5": [...], "generation": text}`, the last two only when
present.
"""

import collections
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from kosmos_jax import errors
from kosmos_jax.eval import common
from kosmos_jax.models import scoring
from kosmos_jax.processing import images as images_lib

TASK = "imagenet_zeroshot"
PROMPT = "The photo of the"
# KOSMOS-1 §4.6: beam 2. 16 new tokens hold any ImageNet name and its `</s>`.
DECODING = common.Decoding(num_beams=2, max_new_tokens=16)
TOP_K = 5
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The evaluation runner's reasons for a query it cannot answer.
MISSING, UNREADABLE = "image file missing", "image unreadable"


@dataclasses.dataclass(frozen=True)
class Truth:
  class_names: tuple[str, ...]  # the candidates, in label order
  labels: tuple[int, ...]  # per query: its index in class_names


# --- reading ---------------------------------------------------------------------


def _lines(path, what: str) -> list[str]:
  if not os.path.isfile(path):
    raise errors.UserError(f"{path}: no such {what} file")
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


def read_class_names(path) -> list[str]:
  """One name per line; trailing blank lines are allowed, others are not."""
  lines = _lines(path, "class-name")
  while lines and not lines[-1].strip():
    lines.pop()
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      raise errors.UserError(f"{path}:{lineno}: a class name is empty")
  return [line.strip() for line in lines]


def read_synset_map(path) -> list[tuple[str, str]]:
  """(synset, name) per line of `n01440764 tench, Tinca tinca`, in file order."""
  out, seen = [], set()
  for lineno, line in enumerate(_lines(path, "synset-map"), 1):
    if not line.strip():
      continue
    parts = line.split(maxsplit=1)
    name = parts[1].split(",")[0].strip() if len(parts) == 2 else ""
    if not name:
      raise errors.UserError(
        f"{path}:{lineno}: expected '<synset> <name>[, <more names>]', got {line.strip()!r}"
      )
    if parts[0] in seen:
      raise errors.UserError(f"{path}:{lineno}: synset {parts[0]} is listed twice")
    seen.add(parts[0])
    out.append((parts[0], name))
  return out


def load(
  split: str = "val",
  num: int | None = None,
  *,
  image_dir: str,
  class_names: str | None = None,
  synset_map: str | None = None,
  strict: bool = False,
) -> common.Dataset:
  """The images under `image_dir` (one folder per class; see the module doc).

  `split` only names the dataset: `image_dir` is the split's folder.
  """
  if not os.path.isdir(image_dir):
    raise errors.UserError(f"{image_dir}: no such image directory")
  folders = sorted(
    e
    for e in os.listdir(image_dir)
    if not e.startswith(".") and os.path.isdir(os.path.join(image_dir, e))
  )
  if not folders:
    raise errors.UserError(
      f"{image_dir}: no class folders; put each class's images in a folder of its own "
      "(the flat ILSVRC2012 val folder must be sorted into synset folders first)"
    )
  if synset_map:
    synsets = read_synset_map(synset_map)
    label_of = {synset: k for k, (synset, _) in enumerate(synsets)}
    names = [name for _, name in synsets]
  else:
    label_of = {folder: k for k, folder in enumerate(folders)}
    names = [folder.replace("_", " ") for folder in folders]
  if class_names:
    given = read_class_names(class_names)
    if len(given) != len(names):
      classes = "lines of the synset map" if synset_map else "class folders"
      raise errors.UserError(
        f"{class_names}: {len(given)} names for {len(names)} classes ({classes})"
      )
    names = given
  skipped, files = collections.Counter(), []
  for folder in folders:
    directory = os.path.join(image_dir, folder)
    for name in sorted(os.listdir(directory)):
      path = os.path.join(directory, name)
      if name.startswith(".") or not os.path.isfile(path):
        continue
      if not name.lower().endswith(IMAGE_EXTENSIONS):
        common.skip_or_raise(skipped, "not an image file", path, strict)
      elif folder not in label_of:
        common.skip_or_raise(skipped, "class folder not in the synset map", path, strict)
      else:
        files.append((name, folder, path))
  files = sorted(files)[:num]
  return common.Dataset(
    task=TASK,
    split=split,
    queries=[common.Query(key=f"{d}/{n}", image=p, prompt=PROMPT) for n, d, p in files],
    truth=Truth(tuple(names), tuple(label_of[d] for _, d, _ in files)),
    decoding=DECODING,
    skipped=skipped,
    source=os.fspath(image_dir),
  )


# --- answering -------------------------------------------------------------------


def prediction(query: common.Query, continuation: str) -> str:
  """The unconstrained answer: the continuation, surrounding spaces dropped."""
  del query
  return continuation.strip()


def candidate_ids(vocab, names: Sequence[str], prompt: str = PROMPT) -> list[list[int]]:
  """Each name's tokens as it continues `prompt`, then `</s>`.

  The tokens of `prompt + " " + name` after those of `prompt` (the name with
  its leading space); the name alone if the tokenizer merged across the
  boundary, which sentencepiece, splitting at spaces, does not.
  """
  head = vocab.encode(prompt)
  out = []
  for name in names:
    ids = vocab.encode(f"{prompt} {name}")
    ids = ids[len(head) :] if ids[: len(head)] == head else vocab.encode(name)
    out.append(ids + [vocab.eos_id])
  return out


def _read_image(image) -> tuple[np.ndarray | None, str]:
  if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
    return None, MISSING
  try:
    return images_lib.to_rgb(image), ""
  except ValueError:
    return None, UNREADABLE


def classify(
  model,
  processor,
  dataset: common.Dataset,
  *,
  batch_size: int = 8,
  candidate_batch_size: int = 128,
  open_ended: bool = False,
  indices: Sequence[int] | None = None,
) -> tuple[dict[int, dict], collections.Counter]:
  """Constrained answers (top 5 names) for `indices` (default every query).

  `batch_size` images go through the processor (and, with `open_ended`, the
  beam-2 generation) together; the scoring runs each image against the
  class names, `candidate_batch_size` names per decoder call. Returns the
  predictions and the queries skipped, by reason (an image missing or
  unreadable), as the evaluation runner's `predict` does.
  """
  names = list(dict.fromkeys(dataset.truth.class_names))  # a repeated name is scored once
  candidates = candidate_ids(processor.vocab, names)
  indices = range(len(dataset.queries)) if indices is None else indices
  predictions, skipped, pending = {}, collections.Counter(), []

  def run(pending):
    rows = [i for i, _ in pending]
    inputs = processor(
      text=[dataset.queries[i].prompt for i in rows],
      images=[picture for _, picture in pending],
      padding_side="left",
    )
    arrays = [
      inputs[k]
      for k in ("input_ids", "pixel_values", "attention_mask", "image_embeds_position_mask")
    ]
    scores = scoring.score_continuations(
      model, *arrays, candidates, batch_size=candidate_batch_size
    )
    texts = _generate(model, processor, arrays, batch_size) if open_ended else None
    for row, i in enumerate(rows):
      best = np.argsort(-scores[row], kind="stable")[:TOP_K]
      predictions[i] = {"top5": [names[j] for j in best]}
      if texts is not None:
        predictions[i]["generation"] = prediction(dataset.queries[i], texts[row])

  for i in indices:
    picture, reason = _read_image(dataset.queries[i].image)
    if picture is None:
      skipped[reason] += 1
      continue
    pending.append((i, picture))
    if len(pending) == batch_size:
      run(pending)
      pending = []
  if pending:
    run(pending)
  return predictions, skipped


def _generate(model, processor, arrays, batch_size: int) -> list[str]:
  """Beam-2 continuations, cut at `</s>`. A short batch is filled with
  copies of its last row, so every batch has one compiled shape."""
  rows = arrays[0].shape[0]
  filled = [np.concatenate([a, np.repeat(a[-1:], batch_size - rows, axis=0)]) for a in arrays]
  out = model.generate(
    *filled,
    max_new_tokens=DECODING.max_new_tokens,
    num_beams=DECODING.num_beams,
    no_repeat_ngram_size=DECODING.no_repeat_ngram_size,
    do_sample=False,
  )
  texts = []
  for ids in out[:rows, arrays[0].shape[1] :].tolist():
    eos = processor.vocab.eos_id
    texts.append(processor.decode(ids[: ids.index(eos)] if eos in ids else ids, True))
  return texts


# --- files -----------------------------------------------------------------------


def _entry(prediction_value) -> tuple[list[str] | None, str | None]:
  """(top5 or None, generation or None) of a prediction value."""
  if isinstance(prediction_value, str):
    return None, prediction_value
  return prediction_value.get("top5"), prediction_value.get("generation")


def write_predictions(path, dataset: common.Dataset, predictions: Mapping[int, object]) -> None:
  """The JSON list of the module doc, in query order."""
  truth, rows = dataset.truth, []
  for i in sorted(k for k in predictions if 0 <= k < len(dataset.queries)):
    top5, generation = _entry(predictions[i])
    row = {
      "image": dataset.queries[i].key,
      "label": truth.class_names[truth.labels[i]],
      "prediction": top5[0] if top5 else None,
    }
    if top5 is not None:
      row["top5"] = list(top5)
    if generation is not None:
      row["generation"] = generation
    rows.append(row)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1, ensure_ascii=False)


def read_predictions(path, dataset: common.Dataset) -> dict[int, object]:
  """Predictions from `write_predictions`' file, matched to queries by `image`."""
  with open(path, encoding="utf-8") as f:
    try:
      rows = json.load(f)
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{path}: not JSON: {e}") from None
  if not isinstance(rows, list):
    raise errors.UserError(f"{path}: expected a JSON list of predictions")
  index = {q.key: i for i, q in enumerate(dataset.queries)}
  out = {}
  for n, row in enumerate(rows):
    where = f"{path}: entry {n}"
    if not isinstance(row, dict) or row.get("image") not in index:
      raise errors.UserError(f"{where}: 'image' names no image of {dataset.source or 'the split'}")
    i = index[row["image"]]
    if i in out:
      raise errors.UserError(f"{where}: {row['image']} is answered twice")
    top5, generation = row.get("top5"), row.get("generation")
    if top5 is not None and not (isinstance(top5, list) and all(isinstance(s, str) for s in top5)):
      raise errors.UserError(f"{where}: 'top5' must be a list of names")
    if generation is not None and not isinstance(generation, str):
      raise errors.UserError(f"{where}: 'generation' must be a string")
    if top5 is None and generation is None:
      raise errors.UserError(f"{where}: neither 'top5' nor 'generation'")
    if top5 is None:
      out[i] = generation
    else:
      out[i] = {"top5": top5} | ({} if generation is None else {"generation": generation})
  return out


# --- metrics ---------------------------------------------------------------------


def sums(dataset: common.Dataset, predictions: Mapping[int, object]) -> dict[str, float]:
  """Hits and counts, the same keys whatever the predictions hold (hosts add them)."""
  truth = dataset.truth
  out = dict.fromkeys(("count", "constrained", "top1", "top5", "open", "top1_open"), 0.0)
  for i, value in predictions.items():
    if not 0 <= i < len(dataset.queries):
      continue
    name = truth.class_names[truth.labels[i]]
    top5, generation = _entry(value)
    out["count"] += 1
    if top5 is not None:
      out["constrained"] += 1
      out["top1"] += float(list(top5[:1]) == [name])
      out["top5"] += float(name in top5[:TOP_K])
    if generation is not None:
      out["open"] += 1
      out["top1_open"] += float(generation.strip() == name)
  return out


def from_sums(dataset: common.Dataset, totals: Mapping[str, float]) -> dict[str, float]:
  """`top1`, `top5` (constrained; also when nothing was answered),
  `top1_open` (when generations were scored), `count`, `skipped/...`."""
  out = {"count": float(totals["count"])}
  if totals["constrained"] or not totals["open"]:
    out["top1"] = totals["top1"] / max(totals["constrained"], 1)
    out["top5"] = totals["top5"] / max(totals["constrained"], 1)
  if totals["open"]:
    out["top1_open"] = totals["top1_open"] / totals["open"]
  # skip_metrics counts the queries without a prediction: `count` of them have one.
  out.update(common.skip_metrics(dataset, dict.fromkeys(range(int(totals["count"])))))
  return out


def score(dataset: common.Dataset, predictions: Mapping[int, object]) -> dict[str, float]:
  return from_sums(dataset, sums(dataset, predictions))
