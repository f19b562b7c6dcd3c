"""Conversation data (LLaVA / SPHINX / PandaGPT style): the JSON-lines format.

One JSON object per line:

  {"id": ...,                                   optional, not read
   "image": "rel/a.jpg" | ["a.jpg", "b.jpg"],   optional; paths relative to the
                                                file (or to `image_dir`)
   "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                     {"from": "gpt", "value": "A <phrase>dog</phrase><box>."}, ...],
   "<modality>": [0.1, ...] | "rel/x.npy" | [[...], ...] | ["a.npy", ...],
   "boxes": [[x0, y0, x1, y1], ...],            optional
   "box_units": "normalized" (default) | "pixels"}

- Roles ("human"/"user", "gpt"/"assistant") alternate from a human turn and
  end with an assistant turn; values are not blank. The template is
  processing/conversation.py's: loss on the answers and the `</s>` after each.
- `<image>` in a value marks where an image goes, in order; their number must
  equal the images'. A record with images and no `<image>` gets them first,
  right after `<s>` (where the Processor puts a single image).
- `<name>`, for a modality of the model (`model.modalities`: name -> width),
  marks where the next vector of the record's field `name` goes: an inline
  list of floats or a `.npy` file (shape [D] or [1, D]; paths relative to the
  JSONL file) of the modality's width. A field with vectors and no `<name>` in
  any value puts them first too (after the images). A field that holds
  vectors (or whose `<name>` appears) but names no modality of the model is
  a problem: the model has no tags for it.
- Values may hold the model's grounding tags (`<grounding>`, `<phrase>`,
  `</phrase>`, `<object>`, `<patch_index_XXXX>`, `</object>`,
  `</delimiter_of_multi_objects/>`), in either role. `<box>` becomes the next
  box of `boxes` as `<object><patch_index_a><patch_index_b></object>`
  (quantised as grounded captions are); "pixels" boxes are divided by the
  first picture's width and height. Other tags (`</s>`, `</image>`, ...) are
  read as plain text.

A line becomes a `Record` of segments (text, a tag, an image, a modality
vector or a box, each with its loss weight) for the tf preprocessor
(conversation_tasks.py); a bad line becomes a Record with a `problem` (a
quality.REASONS name), counted and dropped there.
"""

import dataclasses
import io
import json
import os
import re
from collections.abc import Callable

import numpy as np

from kosmos_jax.processing import conversation as template
from kosmos_jax.processing import vocab as vocab_lib

FIELDS = ("id", "image", "conversations", "boxes", "box_units")
TEXT, TAG, IMAGE, MODALITY, BOX = range(5)  # segment kinds
IMAGE_MARK, BOX_MARK = "<image>", "<box>"
# Tags of the model a value may hold (and the location tokens, by pattern).
MODEL_TAGS = (
  "<grounding>",
  "<phrase>",
  "</phrase>",
  "<object>",
  "</object>",
  "</delimiter_of_multi_objects/>",
)
_NAME_RE = re.compile(r"<([a-z][a-z0-9_]*)>")


@dataclasses.dataclass
class Record:
  key: str  # "file:line"
  texts: list[str] = dataclasses.field(default_factory=list)
  kinds: list[int] = dataclasses.field(default_factory=list)
  weights: list[int] = dataclasses.field(default_factory=list)
  refs: list[int] = dataclasses.field(default_factory=list)  # box index / modality type
  images: list[str] = dataclasses.field(default_factory=list)  # paths
  modality_embeds: np.ndarray | None = None  # float32 [m, D], in slot order
  modality_types: np.ndarray | None = None  # int32 [m]
  boxes: np.ndarray | None = None  # float32 [b, 4]
  box_pixels: bool = False
  problem: str = ""  # "" for a good record, else a quality.REASONS name


def _pattern(names) -> re.Pattern:
  """Placeholders and model tags, each taking the whitespace before it (as the
  vocabulary's tags do, so a value splits where `vocab.encode` splits it)."""
  marks = [IMAGE_MARK, BOX_MARK, *(f"<{n}>" for n in names), *MODEL_TAGS]
  alternatives = "|".join(map(re.escape, sorted(marks, key=len, reverse=True)))
  return re.compile(f"[{vocab_lib.WHITESPACE}]*(?:{alternatives}|<patch_index_[0-9]{{4}}>)")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _entries(value) -> list | None:
  """A modality field's vectors (lists of numbers or paths), None if malformed."""
  if isinstance(value, str):
    return [value]
  if isinstance(value, list):
    if value and all(map(_is_number, value)):
      return [value]
    if all(isinstance(v, (str, list)) for v in value):
      return list(value)
  return None


def _looks_like_vectors(value) -> bool:
  entries = _entries(value)
  return bool(entries) and all(
    (isinstance(e, str) and e.endswith(".npy")) or (isinstance(e, list) and all(map(_is_number, e)))
    for e in entries
  )


def _vector(entry, width: int, base: str, read) -> tuple[np.ndarray | None, str]:
  if isinstance(entry, str):
    data = read(os.path.join(base, entry))
    try:
      array = np.load(io.BytesIO(data), allow_pickle=False) if data else None
    except (ValueError, OSError, EOFError):
      array = None
    if array is None:
      return None, "conversation_modality_missing"
  elif all(map(_is_number, entry)):
    array = np.asarray(entry, np.float64)
  else:
    return None, "conversation_modality_width"
  one_row = array.ndim == 1 or (array.ndim == 2 and array.shape[0] == 1)
  if not np.issubdtype(array.dtype, np.number) or not one_row:
    return None, "conversation_modality_width"
  array = array.reshape(-1).astype(np.float32)
  if array.shape != (width,) or not np.all(np.isfinite(array)):
    return None, "conversation_modality_width"
  return array, ""


def _read(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError:
    return None


def _boxes(row) -> tuple[np.ndarray | None, bool]:
  units = row.get("box_units") or "normalized"  # null reads as absent
  boxes = row.get("boxes")
  boxes = [] if boxes is None else boxes
  ok = units in ("normalized", "pixels") and isinstance(boxes, list)
  ok = ok and all(isinstance(b, list) and len(b) == 4 and all(map(_is_number, b)) for b in boxes)
  if not ok:
    return None, False
  return np.asarray(boxes, np.float32).reshape(-1, 4), units == "pixels"


def parse_line(
  line: bytes | str,
  key: str,
  base: str,
  modalities: dict[str, int] | None = None,
  image_dir: str = "",
  read: Callable[[str], bytes | None] = _read,
) -> Record:
  """The record of one JSON line of a file in folder `base`; `modalities`:
  the model's, name -> width; `read`: a file's bytes, None if unreadable."""
  modalities = dict(modalities or {})
  names = sorted(modalities)
  width = max(modalities.values(), default=0)
  empty = dict(
    modality_embeds=np.zeros([0, width], np.float32),
    modality_types=np.zeros([0], np.int32),
    boxes=np.zeros([0, 4], np.float32),
  )
  bad = lambda problem: Record(key, problem=problem, **empty)
  if isinstance(line, bytes):
    # Invalid UTF-8 survives as lone surrogates, for the preprocessor to repair and count.
    line = line.decode("utf-8", "surrogateescape")
  try:
    row = json.loads(line)
  except ValueError:
    row = None
  if not isinstance(row, dict):
    return bad("conversation_bad_json")
  turns = row.get("conversations")
  found = template.problem(turns)
  if found:
    return bad(f"conversation_{found}")
  values = [t["value"] for t in turns]
  images = row.get("image") or []
  images = [images] if isinstance(images, str) else images
  marks = sum(v.count(IMAGE_MARK) for v in values)
  if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
    return bad("conversation_image_count")
  if marks and marks != len(images):
    return bad("conversation_image_count")
  named = {n for v in values for n in _NAME_RE.findall(v)}
  for field, value in row.items():
    if field not in FIELDS and field not in modalities:
      if field in named or _looks_like_vectors(value):
        return bad("conversation_modality_unknown")
  vectors = {}  # name -> its vectors, in order
  for name in names:
    entries = _entries(row.get(name, []))
    if entries is None:
      return bad("conversation_modality_width")
    vectors[name] = []
    for entry in entries:
      vector, problem = _vector(entry, modalities[name], base, read)
      if problem:
        return bad(problem)
      vectors[name].append(vector)
    count = sum(v.count(f"<{name}>") for v in values)
    if count and count != len(vectors[name]):
      return bad("conversation_modality_count")
  boxes, pixels = _boxes(row)
  if boxes is None or sum(v.count(BOX_MARK) for v in values) != len(boxes):
    return bad("conversation_bad_boxes")

  record = Record(key, images=[os.path.join(image_dir or base, i) for i in images], **empty)
  record.boxes, record.box_pixels = boxes, pixels

  def add(text, kind, weight, ref=0):
    record.texts.append(text)
    record.kinds.append(kind)
    record.weights.append(weight)
    record.refs.append(ref)

  slots = []  # each modality slot's (name, vector)
  if not marks:
    for _ in images:
      add(IMAGE_MARK, IMAGE, 0)
  for t, name in enumerate(names):
    if vectors[name] and not any(f"<{name}>" in v for v in values):
      for vector in vectors[name]:
        add(f"<{name}>", MODALITY, 0, t)
        slots.append(vector)
  pattern, used = _pattern(names), {n: 0 for n in names}
  boxes_used = 0
  for text, loss in template.parts(turns):
    pos = 0
    for m in pattern.finditer(text):
      if m.start() > pos:
        add(text[pos : m.start()], TEXT, int(loss))
      pos, mark = m.end(), m.group().lstrip(vocab_lib.WHITESPACE)
      if mark == IMAGE_MARK:
        add(mark, IMAGE, 0)
      elif mark == BOX_MARK:
        add(mark, BOX, int(loss), boxes_used)
        boxes_used += 1
      elif mark[1:-1] in modalities:
        name = mark[1:-1]
        add(mark, MODALITY, 0, names.index(name))
        slots.append(vectors[name][used[name]])
        used[name] += 1
      else:
        add(mark, TAG, int(loss))
    if pos < len(text):
      add(text[pos:], TEXT, int(loss))
    if loss:
      add(template.EOS, TAG, 1)
  if slots:
    record.modality_embeds = np.stack([np.pad(v, (0, width - len(v))) for v in slots]).astype(
      np.float32
    )
    record.modality_types = np.asarray(
      [record.refs[i] for i, k in enumerate(record.kinds) if k == MODALITY], np.int32
    )
  return record
