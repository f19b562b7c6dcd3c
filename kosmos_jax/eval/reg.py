"""Referring-expression generation (REG) on RefCOCOg: describe the boxed object.

KOSMOS-2 4.2.1: the model reads the image then
`<phrase> It</phrase><object><patch_index_A><patch_index_B></object> is` and
continues greedily; the description is scored against every expression of
the object with METEOR and CIDEr, x100 (the other caption metrics come too),
by `captions.caption_metrics`, which is lichengunc/refer's `refEvaluation`
scoring (PTB tokenizer, coco-caption scorers; reference/evaluation.md 4).

Choices where the paper is silent (reference/evaluation.md 4, UNVERIFIED):
the description is the continuation up to, and without, its first "." or
newline (`prediction`), at most 32 new tokens; no n-gram blocking. The split
is the user's (`refs(umd).p` has train, val and test).

Few-shot (`shots=K`): K demonstrations from the train split come first, each
its image and the same prompt for its box followed by " {its first expression}." (the
paper shows the layout only in a figure); they are drawn per query, by a
generator seeded with `seed` and the query's id (`fewshot.py`), so a query's demonstrations do
not depend on `num` or on the other queries.
"""

import collections
import dataclasses
import json
import os
import pickle
import re
from collections.abc import Mapping

from kosmos_jax import errors
from kosmos_jax.eval import captions, common, fewshot
from kosmos_jax.processing import grounding

DECODING = common.Decoding(num_beams=1, max_new_tokens=32)


@dataclasses.dataclass(frozen=True)
class Ref:
  """One referred object: its id, image path, normalized box and expressions."""

  key: str
  image: str
  box: grounding.Box
  expressions: list[str]


def _box(bbox, width, height) -> grounding.Box | None:
  """COCO's pixel `[x, y, w, h]` as a normalized `(x1, y1, x2, y2)` inside the
  image; None if it is not a box with an area."""
  try:
    x, y, w, h = (float(v) for v in bbox)
    width, height = float(width), float(height)
  except (TypeError, ValueError):
    return None
  if not (width > 0 and height > 0):
    return None
  clip = lambda v: min(max(v, 0.0), 1.0)
  box = (clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height))
  return box if box[2] > box[0] and box[3] > box[1] else None


class _PlainUnpickler(pickle.Unpickler):
  """Lists, dicts, strings and numbers only: a refs file needs no classes, and
  refusing them keeps a stray pickle from running code."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"a refs file holds no objects of class {module}.{name}")


def _read_refs(path: str) -> list:
  try:
    with open(path, "rb") as f:
      # Python 2 pickles: their byte strings are the text of the expressions.
      refs = _PlainUnpickler(f, encoding="utf-8").load()
  except (OSError, pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as e:
    raise errors.UserError(f"{path}: cannot read refer's refs pickle ({e})") from None
  if not isinstance(refs, list):
    raise errors.UserError(f"{path}: refer's refs pickle is a list of refs")
  return refs


def _read_json(path: str, keys: tuple[str, ...], what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: cannot read the {what} ({e})") from None
  if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in keys):
    raise errors.UserError(f"{path}: not a {what} (needs lists {', '.join(keys)})")
  return data


def _by_id(records: list) -> dict:
  return {r["id"]: r for r in records if isinstance(r, dict) and "id" in r}


def _expressions(sentences) -> list[str] | None:
  """The `sent` of each of a ref's sentences (refEvaluation's references)."""
  if not isinstance(sentences, list) or not sentences:
    return None
  sents = [s.get("sent") if isinstance(s, dict) else None for s in sentences]
  return sents if all(isinstance(e, str) for e in sents) else None


def _refer_refs(path, instances, split, image_dir, strict, skipped) -> tuple[list[Ref], set]:
  """lichengunc/refer's refs: `sentences[].sent` are the references."""
  if instances is None:
    raise errors.UserError(f"{path}: refer's refs need its instances.json (boxes, image sizes)")
  records = _read_refs(path)
  coco = _read_json(instances, ("images", "annotations"), "COCO instances file")
  images, anns = _by_id(coco["images"]), _by_id(coco["annotations"])
  refs, ids = [], set()
  for n, ref in enumerate(records):
    if not isinstance(ref, dict) or ref.get("split") != split:
      continue
    where = f"{path}: ref {n} (ref_id {ref.get('ref_id')})"
    expressions = _expressions(ref.get("sentences"))
    if not isinstance(ref.get("ref_id"), int) or not expressions:
      common.skip_or_raise(skipped, "ref does not parse", where, strict)
      continue
    ids.add(str(ref["ref_id"]))
    ann, image = anns.get(ref.get("ann_id")), images.get(ref.get("image_id"))
    if ann is None or image is None or not isinstance(image.get("file_name"), str):
      common.skip_or_raise(skipped, "object not in the instances file", where, strict)
      continue
    box = _box(ann.get("bbox"), image.get("width"), image.get("height"))
    if box is None:
      common.skip_or_raise(skipped, "box has no area", where, strict)
      continue
    picture = os.path.join(image_dir, image["file_name"])
    refs.append(Ref(str(ref["ref_id"]), picture, box, expressions))
  return refs, ids


def _mdetr_refs(path, split, image_dir, strict, skipped) -> tuple[list[Ref], set]:
  """MDETR's `finetune_refcocog_<split>.json`: one record per expression, so an
  object (annotation `original_id`, COCO's ann id) gathers its expressions;
  that id is the results' `ref_id` (MDETR keeps no ref_id)."""
  named = re.fullmatch(r"finetune_(.+)_(\w+)\.json", os.path.basename(path))
  if named and named.group(2) != split:
    raise errors.UserError(f"{path}: the {named.group(2)} split, not {split}")
  data = _read_json(path, ("images", "annotations"), "MDETR refexp file")
  images = _by_id(data["images"])
  objects, order, ids = {}, [], set()
  for n, ann in enumerate(data["annotations"]):
    where = f"{path}: annotation {n}"
    key = ann.get("original_id") if isinstance(ann, dict) else None
    image = None
    if isinstance(key, int):
      ids.add(str(key))
      image = images.get(ann.get("image_id"))
    if image is None or not all(isinstance(image.get(k), str) for k in ("caption", "file_name")):
      common.skip_or_raise(skipped, "annotation does not parse", where, strict)
      continue
    if image.get("dataset_name", "refcocog") != "refcocog":
      raise errors.UserError(f"{path}: {image['dataset_name']} expressions, not refcocog's")
    if key not in objects:
      box = _box(ann.get("bbox"), image.get("width"), image.get("height"))
      if box is None:
        common.skip_or_raise(skipped, "box has no area", where, strict)
        continue
      objects[key] = Ref(str(key), os.path.join(image_dir, image["file_name"]), box, [])
      order.append(key)
    objects[key].expressions.append(image["caption"])
  return [objects[k] for k in order], ids


def _is_json(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(64).lstrip().startswith(b"{")  # a pickle starts with "\x80", "(" or "]"
  except OSError as e:
    raise errors.UserError(f"{path}: cannot read the annotations ({e})") from None


def read_refs(
  path: str, split: str, image_dir: str, *, instances=None, strict=False, skipped=None
) -> tuple[list[Ref], set]:
  """The split's objects, and every id of the split (bad records included)."""
  skipped = collections.Counter() if skipped is None else skipped
  if _is_json(path):
    return _mdetr_refs(path, split, image_dir, strict, skipped)
  return _refer_refs(path, instances, split, image_dir, strict, skipped)


def _demonstration_pool(train: list[Ref], side: int, source: str) -> fewshot.DemonstrationPool:
  """Each train object as the REG prompt of its box and its first expression."""
  return fewshot.DemonstrationPool(
    ((ref.image, f"{grounding.reg_prompt(ref.box, side)} {ref.expressions[0]}.") for ref in train),
    source,
  )


def load(
  split: str,
  num: int | None = None,
  *,
  annotations: str,
  image_dir: str,
  instances: str | None = None,
  strict: bool = False,
  num_patches_per_side: int = 32,
  shots: int = 0,
  seed: int = 0,
  train_annotations: str | None = None,
) -> common.Dataset:
  """One query per object of the split.

  Args:
    split: "train", "val" or "test" (refer's umd split).
    num: only the first `num` objects.
    annotations: refer's `refs(umd).p` (then `instances` too) or MDETR's
      `finetune_refcocog_<split>.json`, as downloaded.
    image_dir: the folder of the COCO train2014 images.
    instances: refer's `instances.json` (image sizes, boxes) for `refs(umd).p`.
    strict: a record that does not parse is an error, not a skip.
    num_patches_per_side: the model's location grid (32 for KOSMOS-2).
    shots: demonstrations per query.
    seed: draws the demonstrations.
    train_annotations: where the train split is for `shots` (default
      `annotations`, which for refer's pickle holds every split).
  """
  skipped = collections.Counter()
  refs, ids = read_refs(
    annotations, split, image_dir, instances=instances, strict=strict, skipped=skipped
  )
  fewshot.check_few_shot(shots, seed)
  pool = fewshot.DemonstrationPool((), annotations)
  if shots:
    if train_annotations is None and _is_json(annotations):
      raise errors.UserError(
        f"{annotations}: MDETR's files hold one split; few-shot needs the train split's "
        "(--train-annotations finetune_refcocog_train.json)"
      )
    source = train_annotations or annotations
    train, _ = read_refs(source, "train", image_dir, instances=instances)
    if len(train) < shots:
      raise errors.UserError(f"{source}: {len(train)} train objects for {shots} shots")
    pool = _demonstration_pool(train, num_patches_per_side, source)
  queries = [
    common.Query(
      r.key,
      r.image,
      grounding.reg_prompt(r.box, num_patches_per_side),
      pool.draw(shots, seed, r.key, r.image),
    )
    for r in refs[:num]
  ]
  truth = captions.Truth([r.expressions for r in refs[:num]], frozenset(ids))
  return common.Dataset("refcocog_reg", split, queries, truth, DECODING, skipped, annotations)


def prediction(query: common.Query, continuation: str) -> str:
  """The description: the continuation without markup, up to its first "."
  or newline."""
  del query
  text = grounding.clean_text_and_extract_entities(continuation)[0]
  return " ".join(re.split(r"[.\n]", text, maxsplit=1)[0].split())


def write_predictions(path: str, dataset: common.Dataset, predictions: Mapping[int, str]) -> None:
  """`[{"ref_id", "caption"}]` (COCO's caption results with the ref in place of the image)."""
  common.write_json_results(path, dataset, predictions, "ref_id", "caption")


def read_predictions(path: str, dataset: common.Dataset, partial: bool = False) -> dict[int, str]:
  """See `common.read_json_results`."""
  return common.read_json_results(path, dataset, "ref_id", "caption", dataset.truth.ids, partial)


def score(dataset: common.Dataset, predictions: Mapping[int, str]) -> dict[str, float]:
  """`METEOR`, `CIDEr` (and BLEU-n, ROUGE-L), x100, over the predicted queries."""
  return captions.score(dataset, predictions)
