"""Captioning on the Karpathy splits of COCO and Flickr30k, scored by pycocoevalcap.

The model reads the image then `An image of` and continues with beam search
(5 beams; KOSMOS-1 4.1.1, KOSMOS-2 4.3.1). The scored caption is the
continuation only, without markup: whether the papers scored the prompt
words too is not stated (reference/evaluation.md 5, UNVERIFIED); scoring the
continuation is the usual practice. Captions are cut at 30 new tokens (the
papers state no limit; COCO captions have about 10 words).

`caption_metrics` is COCOEvalCap's scoring (pycocoevalcap 1.2, the package
both papers cite): the PTB tokenizer on references and hypotheses, then
BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), x100. CIDEr's document frequencies
come from the scored references, so score a whole split at once. SPICE is not
computed: it downloads Stanford CoreNLP models on first use and fails on
Java 17 (reference/evaluation.md 8).

Few-shot (`shots=K`, KOSMOS-1 4.1.1: demonstrations "randomly sampled from the
training set"): K images of the same file's Karpathy train split (with
restval) come first, each with `An image of {caption}`, the caption being the
record's first reference (its first `raw` sentence, stripped; the papers show
the layout only in a figure, reference/evaluation.md 7, UNVERIFIED). They are
drawn per query by `fewshot.DemonstrationPool`, seeded with `seed` and the query's id,
so a query's demonstrations do not depend on `num` or on the other queries.

The PTB tokenizer and METEOR are Java programs (the jars run on OpenJDK 17).
Without `java` on the PATH the scores are still computed, over
`simple_tokenize`, without METEOR, and with a `no_java/simple_tokenizer` key
saying so.
"""

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from kosmos_jax import errors
from kosmos_jax.eval import common, fewshot
from kosmos_jax.processing import grounding

PROMPT = "An image of"
DECODING = common.Decoding(num_beams=5, max_new_tokens=30)
TASKS = {"coco_caption": "coco", "flickr30k_caption": "flickr30k"}  # task -> Karpathy `dataset`
NO_JAVA = "no_java/simple_tokenizer"

# Line breaks other than "\n" would shift the tokenizer's lines (one per caption).
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


@dataclasses.dataclass(frozen=True)
class Truth:
  """`references[i]`: query i's reference texts; `ids`: every id of the
  split, for refusing another split's results."""

  references: list[list[str]]
  ids: frozenset[str]
  meteor: bool = True


# --- Tokenization ----------------------------------------------------------------

# PTB's tokens that COCOEvalCap drops. Its list spells the bracket tokens in
# upper case, so the lower-cased "-lrb-" etc. stay, as they do here.
_DROPPED = frozenset(("''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"))
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_TOKENS = frozenset(_BRACKETS.values())
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta"}
# Abbreviations whose period PTB keeps ("mr. smith", "etc.").
_ABBREVIATIONS = frozenset(("mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "co."))


def _ptb_word(word: str) -> list[str]:
  """PTB's tokens for one whitespace-free, lower-cased word (approximately)."""
  if word in _SPLIT_WORDS:
    return _SPLIT_WORDS[word].split()
  if word in _BRACKET_TOKENS:
    return [word]
  head, tail = [], []
  # Leading quotes, hyphens, currency and hash marks are tokens of their own,
  # but "'90s" keeps its apostrophe.
  while word and (word[0] in "`-$#" or (word[0] == "'" and not word[1:2].isdigit())):
    head.append(word[0])
    word = word[1:]
  while word and word[-1] in "'-%/.,;:?!" and not (word[-1] == "." and _keeps_period(word)):
    tail.insert(0, word[-1])
    word = word[:-1]
  clitic = re.search(r"(n't|'s|'re|'ve|'ll|'d|'m)$", word)
  if clitic and clitic.start() > 0:
    tail.insert(0, clitic.group(1))
    word = word[: clitic.start()]
  return head + ([word] if word else []) + tail


def _keeps_period(word: str) -> bool:
  # "u.s.", "a.m." and the listed abbreviations keep their final period.
  return word in _ABBREVIATIONS or re.fullmatch(r"([a-z]\.)+", word) is not None


def simple_tokenize(text: str) -> str:
  """A pure-Python stand-in for COCOEvalCap's tokenization (PTBTokenizer
  -lowerCase, then its punctuation tokens dropped).

  It lower-cases; brackets become "-lrb-" etc.; quotes, `. , ; : ? !` and
  stand-alone hyphens and "--"/"..." go; clitics split ("is n't", "man 's",
  "ca n't"); `$ # %` and a final "/" ("w/") are tokens of their own; a period
  stays inside numbers ("3.5") and letter abbreviations ("u.s."), as do ","
  and ":" between digits.
  PTB differs on rarer text: other abbreviations, glued sentences ("dog.the"),
  "?!" runs (PTB keeps them), non-ASCII quotes and dashes.
  """
  text = text.lower().replace('"', " ").replace("...", " ").replace("--", " ")
  for bracket, token in _BRACKETS.items():
    text = text.replace(bracket, f" {token} ")
  # Commas and colons split words except between digits ("1,000", "10:30").
  text = re.sub(r"(?<![0-9])([,;:?!])|([,;:?!])(?![0-9])", r" \1\2 ", text)
  tokens = [t for word in text.split() for t in _ptb_word(word)]
  return " ".join(t for t in tokens if t not in _DROPPED)


def _ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
  """COCOEvalCap's tokenization (Java), one call for all captions."""
  given = {k: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in v] for k, v in captions.items()}
  out = PTBTokenizer().tokenize(given)
  if any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
    raise RuntimeError("the PTB tokenizer lost captions (its output has fewer lines)")
  return out


def caption_metrics(
  references: Mapping[Hashable, Sequence[str]],
  hypotheses: Mapping[Hashable, str],
  meteor: bool = True,
) -> dict[str, float]:
  """COCOEvalCap's scores (x100) of one hypothesis per key against the key's
  references, over the keys of `hypotheses`; `count` is their number.
  `meteor=False` leaves METEOR out: its JVM takes ~5 s to start."""
  keys = list(hypotheses)
  if not keys:
    return {"count": 0.0}
  if not all(references.get(k) for k in keys):
    raise ValueError("every hypothesis needs references (COCOEvalCap's scorers assert so)")
  java = shutil.which("java") is not None
  # Keys 0..n-1 for the scorers; references and hypotheses tokenized in one go.
  both = {("ref", n): list(references[k]) for n, k in enumerate(keys)}
  both |= {("hyp", n): [hypotheses[k]] for n, k in enumerate(keys)}
  if java:
    tokens = _ptb_tokenize(both)
  else:
    tokens = {k: [simple_tokenize(c) for c in v] for k, v in both.items()}
  gts = {n: tokens["ref", n] for n in range(len(keys))}
  res = {n: tokens["hyp", n] for n in range(len(keys))}
  out = {}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  for n, value in enumerate(bleu, 1):
    out[f"BLEU-{n}"] = 100 * float(value)
  if java and meteor:
    out["METEOR"] = 100 * float(Meteor().compute_score(gts, res)[0])
  out["ROUGE-L"] = 100 * float(Rouge().compute_score(gts, res)[0])
  out["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
  out["count"] = float(len(keys))
  if not java:
    out[NO_JAVA] = 1.0
    logging.warning(
      "no `java` on the PATH: caption scores use a pure-Python tokenization (close to, not "
      "exactly, the PTB tokenizer) and METEOR is not computed"
    )
  return out


# --- Loading ---------------------------------------------------------------------


def _sentences(record) -> list[str] | None:
  sentences = record.get("sentences")
  if not isinstance(sentences, list):
    return None
  raws = [s.get("raw") if isinstance(s, dict) else None for s in sentences]
  return raws if all(isinstance(r, str) for r in raws) else None


def _image(record, image_dir: str, coco: bool) -> tuple[str, str] | None:
  """(key, image path) of a Karpathy record; None if it does not parse."""
  filename, folder = record.get("filename"), record.get("filepath", "")
  if not isinstance(filename, str) or not isinstance(folder, str):
    return None
  if coco:
    # COCO's id is `cocoid`; the file lies in its `filepath` (train2014, val2014).
    if not isinstance(record.get("cocoid"), int):
      return None
    return str(record["cocoid"]), os.path.join(image_dir, folder, filename)
  # Flickr30k's `imgid` is the record's position; the file name's stem is the
  # Flickr photo id that Flickr30k Entities and other results use.
  return os.path.splitext(filename)[0], os.path.join(image_dir, filename)


def _continuing(sentence: str) -> str:
  """A reference as the prompt's continuation: "A red bus." -> "a red bus."
  ("An image of a red bus.", as the model is asked to go on)."""
  return sentence[:1].lower() + sentence[1:]


def _demonstration_pool(
  data: dict, image_dir: str, coco: bool, source: str
) -> fewshot.DemonstrationPool:
  """Each train (and restval) image once, with `An image of {its first reference}`
  (first letter lower-cased)."""
  pairs, seen = [], set()
  for record in data["images"]:
    if not isinstance(record, dict) or record.get("split") not in ("train", "restval"):
      continue
    image, sentences = _image(record, image_dir, coco), _sentences(record)
    if image is None or not sentences or not sentences[0].strip() or image[0] in seen:
      continue
    seen.add(image[0])
    pairs.append((image[1], f"{PROMPT} {_continuing(sentences[0].strip())}"))
  return fewshot.DemonstrationPool(pairs, source)


def load(
  split: str = "test",
  num: int | None = None,
  *,
  annotations: str,
  image_dir: str,
  strict: bool = False,
  task: str = "coco_caption",
  meteor: bool = True,
  shots: int = 0,
  seed: int = 0,
) -> common.Dataset:
  """The images of one Karpathy split.

  Args:
    split: "train", "val" or "test" ("train" takes "restval" too: COCO's
      113,287 training images).
    num: only the first `num` records of the split.
    annotations: `dataset_coco.json` or `dataset_flickr30k.json`, as downloaded.
    image_dir: COCO: the folder with train2014/ and val2014/; Flickr30k: the
      folder of the jpgs.
    strict: a record that does not parse is an error, not a skip.
    task: "coco_caption" (ids: `cocoid`) or "flickr30k_caption" (ids: the
      file name's stem, the Flickr photo id).
    meteor: compute METEOR (False: the other metrics, ~5 s sooner).
    shots: demonstrations per query, from the file's train split (with
      restval): `An image of {first reference}` after the image, the image's
      path made as the queries' are. Records of that split that do not parse
      or have no (non-blank) first reference are left out of the draw.
    seed: draws the demonstrations (with each query's id).
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
  fewshot.check_few_shot(shots, seed)
  try:
    with open(annotations, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{annotations}: cannot read the Karpathy file ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise errors.UserError(f"{annotations}: not a Karpathy split file (no 'images' list)")
  if data.get("dataset", TASKS[task]) != TASKS[task]:
    raise errors.UserError(f"{annotations}: the {data['dataset']} file, not {TASKS[task]}'s")
  coco = task == "coco_caption"
  pool = _demonstration_pool(data, image_dir, coco, annotations) if shots else None
  if pool is not None and len(pool) < shots:
    raise errors.UserError(
      f"{annotations}: {len(pool)} train images with a caption for shots={shots}"
    )
  splits = {split, "restval"} if split == "train" else {split}
  records = [r for r in data["images"] if isinstance(r, dict) and r.get("split") in splits]
  images = [_image(r, image_dir, coco) for r in records]
  skipped, queries, references, seen = collections.Counter(), [], [], set()
  for n, (record, image) in enumerate(zip(records[:num] if num is not None else records, images)):
    where = f"{annotations}: {split} image {n} ({record.get('filename')})"
    sentences = _sentences(record)
    if image is None or sentences is None:
      common.skip_or_raise(skipped, "record does not parse", where, strict)
    elif not sentences:
      common.skip_or_raise(skipped, "no reference captions", where, strict)
    elif image[0] in seen:
      common.skip_or_raise(skipped, "image repeated", where, strict)
    else:
      seen.add(image[0])
      shown = pool.draw(shots, seed, image[0], image[1]) if pool is not None else ()
      queries.append(common.Query(image[0], image[1], PROMPT, shown))
      references.append(sentences)
  truth = Truth(references, frozenset(image[0] for image in images if image), meteor)
  return common.Dataset(task, split, queries, truth, DECODING, skipped, source=annotations)


# --- Predictions and scores ------------------------------------------------------


def clean_caption(continuation: str) -> str:
  """The text without markup, on one line, stripped."""
  return " ".join(grounding.clean_text_and_extract_entities(continuation)[0].split())


def prediction(query: common.Query, continuation: str) -> str:
  """The caption: the continuation of `An image of` (the prompt words are not
  part of it), without markup."""
  del query
  return clean_caption(continuation)


def write_predictions(path: str, dataset: common.Dataset, predictions: Mapping[int, str]) -> None:
  """COCO's caption results file, `[{"image_id", "caption"}]`."""
  common.write_json_results(path, dataset, predictions, "image_id", "caption")


def read_predictions(path: str, dataset: common.Dataset, partial: bool = False) -> dict[int, str]:
  """See `common.read_json_results`."""
  return common.read_json_results(path, dataset, "image_id", "caption", dataset.truth.ids, partial)


def score(dataset: common.Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  """`caption_metrics` over the queries with a prediction, and the skips."""
  scored = {i: t for i, t in predictions.items() if 0 <= i < len(dataset.queries)}
  metrics = caption_metrics(dict(enumerate(dataset.truth.references)), scored, dataset.truth.meteor)
  return metrics | common.skip_metrics(dataset, scored)
