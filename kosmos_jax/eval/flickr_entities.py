"""Phrase grounding on Flickr30k Entities (task `flickr30k_entities`; KOSMOS-2 Table 2).

Scored as the official `flickr_entities_evaluate.py` (reference/evaluation.md 2,
11): one query per phrase of MDETR's `final_flickr_separateGT_{val,test}.json`,
in file order; the prompt is `<grounding>{caption before the phrase} <phrase>{phrase}</phrase>`
(`cook_data.py`); the answer is every box of the hypothesis whose phrase is
the query's, in generation order; R@k is a hit when one of the first k boxes
has IoU >= 0.5 with any true box of the phrase's chain (ANY-BOX); a phrase
with no such box is a miss. The true boxes come from the Flickr30k Entities
`Annotations/*.xml`, found through the sentence's phrase of the same text (the
first one when a sentence repeats a phrase, as the official scorer does).

The prompt keeps the official string, with its leading space (first phrase) or
double space before `<phrase>`: our tokenizer gives a tag the whitespace before
it (`processing/vocab.py`), so the spaces add no token. The official driver
gets the same ids when its SentencePiece model collapses whitespace, the
library's default (unverified for that model file, reference 2).
"""

import collections
import dataclasses
import os
from collections.abc import Mapping
from xml.etree import ElementTree

from kosmos_jax import errors
from kosmos_jax.eval import common, official_boxes

TASK = "flickr30k_entities"
SPLITS = ("val", "test")
PREDICTIONS_SUFFIX = "txt"
TOPK = (1, 5, 10)
# The official run is greedy with no-repeat-ngram 3 (blocking only after the
# prompt) and at most 500 tokens in all, prompt and 64 image slots included;
# 64 new tokens hold a phrase's boxes many times over.
DECODING = common.Decoding(num_beams=1, max_new_tokens=64, no_repeat_ngram_size=3)

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Phrase:
  """One query's truth: its text, its chain's boxes (pixels, x1 y1 x2 y2), the
  chain's types ("people", "clothing", ...) and the picture's size."""

  text: str
  boxes: tuple[Box, ...]
  types: tuple[str, ...]
  width: float
  height: float


@dataclasses.dataclass(frozen=True)
class Truth:
  phrases: list[Phrase]  # one per query
  num_patches_per_side: int


# --- Flickr30k Entities files ------------------------------------------------


def parse_sentence(line: str) -> list[tuple[str, str, tuple[str, ...]]]:
  """(text, chain id, types) of each `[/EN#<chain>/<type>.. words]` of a
  `Sentences/<id>.txt` line, split on whitespace as the dataset's reader does:
  a phrase ends at its first word that ends in "]"."""
  phrases, words, chain, types = [], None, "", ()
  for token in line.split():
    if words is not None:
      words.append(token[:-1] if token.endswith("]") else token)
      if token.endswith("]"):
        phrases.append((" ".join(words), chain, types))
        words = None
    elif token.startswith("["):
      parts = token.split("/")
      if len(parts) < 2 or not parts[1].startswith("EN#"):
        raise ValueError(f"{token!r} is not a phrase mark [/EN#<chain>/<type>..")
      words, chain, types = [], parts[1][3:], tuple(parts[2:])
  if words is not None:
    raise ValueError("a phrase has no closing ']'")
  return phrases


def read_sentences(path: str) -> list[list[tuple[str, str, tuple[str, ...]]]]:
  """The phrases of each sentence of a file; empty lines are not sentences
  (their count is what MDETR's `sentence_id` indexes)."""
  with open(path, encoding="utf-8") as f:
    return [parse_sentence(line) for line in f.read().split("\n") if line]


def read_boxes(path: str) -> dict[str, list[Box]]:
  """chain id -> its boxes, from an `Annotations/<id>.xml`; a `<nobndbox>` or
  `<scene>` object has none. An object with several names is a box of each."""
  boxes = {}
  for obj in ElementTree.parse(path).getroot().findall("object"):
    bndbox = obj.find("bndbox")
    if bndbox is None:
      continue
    box = tuple(float(int(bndbox.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
    for name in obj.findall("name"):
      if not name.text:
        raise ValueError("an <object> has an empty <name>")
      boxes.setdefault(name.text, []).append(box)
  return boxes


def _read_image_files(root: str, image_id: str):
  """(sentences, boxes) of one image, or the reason they cannot be used."""
  xml = os.path.join(root, "Annotations", f"{image_id}.xml")
  txt = os.path.join(root, "Sentences", f"{image_id}.txt")
  if not os.path.isfile(xml):
    return "Annotations file missing"
  if not os.path.isfile(txt):
    return "Sentences file missing"
  try:
    boxes = read_boxes(xml)
  except (ElementTree.ParseError, TypeError, ValueError):
    return "Annotations file does not parse"
  try:
    sentences = read_sentences(txt)
  except (UnicodeDecodeError, ValueError):
    return "Sentences file does not parse"
  return sentences, boxes


def _caption_row(item) -> tuple:
  """The fields of an MDETR `images` entry that the evaluation uses."""
  caption, file_name = item["caption"], item["file_name"]
  if not isinstance(caption, str) or not isinstance(file_name, str):
    raise TypeError("caption and file_name must be strings")
  # The official cook and scorer use the first span of each phrase only.
  spans = [(int(pos[0][0]), int(pos[0][1])) for pos in item["tokens_positive_eval"]]
  return (
    caption,
    file_name,
    str(item["original_img_id"]),
    int(item["sentence_id"]),
    float(item["width"]),
    float(item["height"]),
    spans,
  )


def load(
  split: str = "val",
  num: int | None = None,
  *,
  annotations: str,
  flickr_entities_dir: str,
  image_dir: str,
  strict: bool = False,
  num_patches_per_side: int = 32,
) -> common.Dataset:
  """The phrases of the first `num` captions (MDETR `images` entries) of a split.

  Args:
    split: "val" or "test".
    num: captions to read (None: all).
    annotations: MDETR `final_flickr_separateGT_{split}.json`.
    flickr_entities_dir: the Flickr30k Entities folder (`{split}.txt`,
      `Sentences/`, `Annotations/`).
    image_dir: the Flickr30k images (`flickr30k-images`).
    strict: raise on the first bad record instead of counting it.
    num_patches_per_side: the model's location grid (32 for KOSMOS-2).
  """
  if split not in SPLITS:
    raise errors.UserError(f"{TASK}: split {split!r}; the splits are {SPLITS}")
  official_boxes.check_file_name(
    annotations, r"final_flickr_(?:separate|merged)GT_(\w+)\.json", (split,)
  )
  listing = os.path.join(flickr_entities_dir, f"{split}.txt")
  if not os.path.isfile(listing):
    raise errors.UserError(
      f"{listing}: missing; is {flickr_entities_dir} the Flickr30k Entities folder?"
    )
  with open(listing, encoding="utf-8") as f:
    split_ids = {line.strip() for line in f}
  items = official_boxes.read_mdetr_json(annotations, ("images",))["images"][:num]

  queries, phrases, skipped, files = [], [], collections.Counter(), {}
  for i, item in enumerate(items):
    where = f"{annotations}: images[{i}]"
    if isinstance(item, dict) and item.get("dataset_name", "flickr") != "flickr":
      name = item["dataset_name"]
      raise errors.UserError(f"{where}: dataset_name {name!r}, so the file is not for {TASK}")
    try:
      caption, file_name, image_id, sentence_id, width, height, spans = _caption_row(item)
    except (KeyError, IndexError, TypeError, ValueError):
      common.skip_or_raise(skipped, "caption row does not parse", where, strict)
      continue
    where += f" (image {image_id}, sentence {sentence_id})"
    if image_id not in split_ids:
      common.skip_or_raise(skipped, f"image not in {split}.txt", where, strict)
      continue
    if image_id not in files:
      files[image_id] = _read_image_files(flickr_entities_dir, image_id)
    if isinstance(files[image_id], str):
      common.skip_or_raise(skipped, files[image_id], where, strict)
      continue
    sentences, boxes = files[image_id]
    if not 0 <= sentence_id < len(sentences):
      common.skip_or_raise(skipped, "sentence_id not in the Sentences file", where, strict)
      continue
    # Phrases whose chain has no box are not evaluated: the scorer drops them
    # before it looks a phrase up by its text.
    boxed = [p for p in sentences[sentence_id] if p[1] in boxes]
    for start, end in spans:
      text = caption[start:end]
      found = next((p for p in boxed if p[0] == text), None)
      if found is None:
        reason = "phrase not among the sentence's phrases with boxes"
        common.skip_or_raise(skipped, reason, f"{where}: {text!r}", strict)
        continue
      _, chain, types = found
      queries.append(
        common.Query(
          key=str(len(queries)),
          image=os.path.join(image_dir, file_name),
          prompt=f"<grounding>{caption[:start]} <phrase>{text}</phrase>",
        )
      )
      phrases.append(Phrase(text, tuple(boxes[chain]), types, width, height))
  return common.Dataset(
    task=TASK,
    split=split,
    queries=queries,
    truth=Truth(phrases, num_patches_per_side),
    decoding=DECODING,
    skipped=skipped,
    source=annotations,
  )


# --- predictions and scores --------------------------------------------------


# H-lines, as the official scorers read them.
prediction = official_boxes.prediction
write_predictions = official_boxes.write_predictions
read_predictions = official_boxes.read_predictions


def _types(truth: Truth) -> list[str]:
  return sorted({t for p in truth.phrases for t in p.types})


def sums(dataset: common.Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  """Hits at each k and phrases scored, overall and (R@1) per phrase type.

  The keys depend on the dataset only, so that hosts' sums add up.
  """
  truth = dataset.truth
  out = {"count": 0.0, "hits@all": 0.0, **{f"hits@{k}": 0.0 for k in TOPK}}
  for t in _types(truth):
    out[f"count/{t}"] = out[f"hits@1/{t}"] = 0.0
  for i, phrase in enumerate(truth.phrases):
    if i not in predictions:
      continue  # skipped by the runner: reported by skip_metrics, not a miss
    found = official_boxes.matching_boxes(
      predictions[i], phrase.text, phrase.width, phrase.height, truth.num_patches_per_side
    )
    out["count"] += 1
    out["hits@all"] += official_boxes.hit(found, phrase.boxes)
    for k in TOPK:
      out[f"hits@{k}"] += official_boxes.hit(found[:k], phrase.boxes)
    # A phrase of several types counts in each, as in the official table.
    for t in phrase.types:
      out[f"count/{t}"] += 1
      out[f"hits@1/{t}"] += official_boxes.hit(found[:1], phrase.boxes)
  return out


def from_sums(dataset: common.Dataset, sums: Mapping[str, float]) -> dict[str, float]:
  """`R@1`, `R@5`, `R@10`, `upper_bound` (all boxes) and `R@1/<type>`, each
  where it has a phrase to count (none: left out, not 0), `count`, skips."""
  n = sums["count"]
  out = {f"R@{k}": sums[f"hits@{k}"] / n for k in TOPK if n}
  if n:
    out["upper_bound"] = sums["hits@all"] / n
  for t in _types(dataset.truth):
    if sums[f"count/{t}"]:
      out[f"R@1/{t}"] = sums[f"hits@1/{t}"] / sums[f"count/{t}"]
  out["count"] = n
  # skip_metrics counts the queries with a prediction; the sums hold how many.
  out.update(common.skip_metrics(dataset, dict.fromkeys(range(int(n)), "")))
  return out


def score(dataset: common.Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  return from_sums(dataset, sums(dataset, predictions))
