"""A `POST /v1/generate` body -> prompt, picture and generation options.

Every problem is a `BadRequest` whose message names the field and what to
send instead; nothing here touches the model. Prompt formats per task are
KOSMOS-2's (reference/kosmos2.md 2.7).
"""

import base64
import binascii
import dataclasses
import io
import json
import math
import warnings

import numpy as np
from PIL import Image

from kosmos_jax.eval import rec
from kosmos_jax.processing import grounding
from kosmos_jax.processing import images as images_lib


class BadRequest(Exception):
  """A request the server refuses: `status` (4xx, or 503) and a message."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
  max_image_bytes: int = 20_000_000
  max_image_side: int = 8000  # pixels, either side
  max_new_tokens: int = 512  # the most one request may ask for
  max_beams: int = 8


# Task -> (fields it needs, fields it may have), besides image and options.
TASKS = {
  "caption_brief": ((), ()),
  "caption_detailed": ((), ()),
  "grounding": (("phrase",), ("context",)),
  "rec": (("phrase",), ()),
  "reg": (("box",), ()),
  "vqa": (("question",), ()),
  "free": (("prompt",), ("box",)),
}
BRIEF = "<grounding>An image of"
DETAILED = "<grounding>Describe this image in detail:"
# Generation options a request may set: name -> (type, check, what it must be).
OPTIONS = {
  "max_new_tokens": (int, lambda v, lim: 1 <= v <= lim.max_new_tokens, "an integer in [1, {max}]"),
  "num_beams": (int, lambda v, lim: 1 <= v <= lim.max_beams, "an integer in [1, {beams}]"),
  "do_sample": (bool, lambda v, lim: True, "true or false"),
  "temperature": (float, lambda v, lim: v > 0, "a number > 0"),
  "top_k": (int, lambda v, lim: v >= 0, "an integer >= 0 (0: off)"),
  "top_p": (float, lambda v, lim: 0 < v <= 1, "a number in (0, 1]"),
  "no_repeat_ngram_size": (int, lambda v, lim: v >= 0, "an integer >= 0 (0: off)"),
  "repetition_penalty": (float, lambda v, lim: v > 0, "a number > 0 (1: off)"),
  "seed": (int, lambda v, lim: 0 <= v < 2**31, "an integer in [0, 2**31)"),
}
TEXT_FIELDS = ("phrase", "context", "question", "prompt")
FIELDS = ("image", "task", "box", *TEXT_FIELDS, *OPTIONS)
# 16-bit and float pixels would be clipped to black and white by the RGB
# conversion, LAB and HSV read as if RGB: refuse them rather than guess.
REFUSED_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F", "LAB", "HSV")


@dataclasses.dataclass
class Parsed:
  task: str
  prompt: str
  bboxes: list | None  # for the processor: the free prompt's one phrase gets the box
  image: np.ndarray  # (H, W, 3) uint8
  options: dict  # every generation option, defaults filled in
  box: tuple | None


def parse_json(body: bytes) -> dict:
  try:
    value = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRequest(f"malformed JSON: {e}") from None
  if not isinstance(value, dict):
    raise BadRequest(f"the body must be a JSON object, got {type(value).__name__}")
  return value


def read_image(value, limits: Limits) -> np.ndarray:
  """Base64 (optionally a `data:image/...;base64,` URL) -> (H, W, 3) uint8,
  checking size before decoding pixels: the header says how large it is."""
  if not isinstance(value, str) or not value:
    raise BadRequest("image: expected a base64 string (or a data: URL) of a PNG, JPEG, ... file")
  if value.startswith("data:"):
    value = value.partition(",")[2]
  value = "".join(value.split())  # `base64` without -w0 wraps its lines
  if len(value) * 3 // 4 > limits.max_image_bytes + 3:
    raise BadRequest(
      f"image: about {len(value) * 3 // 4} bytes; the limit is {limits.max_image_bytes} "
      "(kosmos-jax serve --max-image-bytes)",
      413,
    )
  try:
    data = base64.b64decode(value, validate=True)
  except (binascii.Error, ValueError) as e:
    raise BadRequest(f"image: not valid base64 ({e})") from None
  if len(data) > limits.max_image_bytes:
    raise BadRequest(
      f"image: {len(data)} bytes; the limit is {limits.max_image_bytes} "
      "(kosmos-jax serve --max-image-bytes)",
      413,
    )
  try:
    with warnings.catch_warnings():  # our side limit comes first; PIL's bomb check stays
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      picture = Image.open(io.BytesIO(data))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadRequest(f"image: not an image PIL can read (PNG, JPEG, GIF, WebP, ...): {e}") from None
  width, height = picture.size
  if max(width, height) > limits.max_image_side:
    raise BadRequest(
      f"image: {width} x {height} pixels; the limit is {limits.max_image_side} per side "
      "(kosmos-jax serve --max-image-side)",
      413,
    )
  if picture.mode in REFUSED_MODES:
    raise BadRequest(f"image: unsupported mode {picture.mode!r}; send 8-bit RGB or grayscale")
  try:
    picture.load()
    return images_lib.to_rgb(picture)
  except (OSError, ValueError) as e:
    raise BadRequest(f"image: cannot decode it: {e}") from None


def parse_box(value) -> tuple[float, float, float, float]:
  ok = (
    isinstance(value, list)
    and len(value) == 4
    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    and all(math.isfinite(v) for v in value)
  )
  if ok:
    x1, y1, x2, y2 = (float(v) for v in value)
    ok = 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
  if not ok:
    raise BadRequest(
      f"box: {json.dumps(value)} is not [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1 and "
      "0 <= y1 < y2 <= 1 (fractions of the picture's width and height)"
    )
  return x1, y1, x2, y2


def _text(fields: dict, name: str, markup: bool = False) -> str:
  value = fields[name]
  if not isinstance(value, str) or not value.strip():
    raise BadRequest(f"{name}: expected a non-empty string")
  if not markup and ("<" in value or ">" in value):
    raise BadRequest(f"{name}: no '<' or '>' (markup); send a raw prompt with task 'free'")
  return value.strip()


def task_prompt(task: str, fields: dict, box, num_patches_per_side: int):
  """(prompt, bboxes) of a task, as KOSMOS-2 was evaluated on it."""
  if task == "caption_brief":
    return BRIEF, None
  if task == "caption_detailed":
    return DETAILED, None
  if task == "rec":
    return rec.prompt(_text(fields, "phrase")), None
  if task == "grounding":  # Flickr30k Entities: the caption before the phrase is context.
    context = _text(fields, "context") + " " if "context" in fields else ""
    return f"<grounding>{context}<phrase>{_text(fields, 'phrase')}</phrase>", None
  if task == "reg":
    return grounding.reg_prompt(box, num_patches_per_side), None
  if task == "vqa":
    return f"<grounding> Question: {_text(fields, 'question')} Answer:", None
  prompt = _text(fields, "prompt", markup=True)
  if "<image>" in prompt:
    raise BadRequest("prompt: one picture per request, placed first; no <image> placeholders")
  if box is None:
    return prompt, None
  if prompt.count("<phrase>") != 1:
    raise BadRequest("box: with task 'free' the prompt needs exactly one <phrase>..</phrase>")
  return prompt, [[box]]


def _option(name: str, value, limits: Limits):
  kind, check, what = OPTIONS[name]
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
  if not ok or (kind is float and not math.isfinite(value)) or not check(value, limits):
    what = what.format(max=limits.max_new_tokens, beams=limits.max_beams)
    raise BadRequest(f"{name}: {json.dumps(value)} is not {what}")
  return value


def parse(body: bytes, limits: Limits, defaults: dict, num_patches_per_side: int) -> Parsed:
  """A request body -> `Parsed`; `defaults` has a value for every option."""
  fields = parse_json(body)
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise BadRequest(f"unknown field(s) {unknown}; known: {', '.join(FIELDS)}")
  for name in ("image", "task"):
    if name not in fields:
      raise BadRequest(f"missing field '{name}'")
  task = fields["task"]
  if task not in TASKS:
    raise BadRequest(f"task: unknown {json.dumps(task)}; one of {', '.join(TASKS)}")
  needs, may = TASKS[task]
  for name in needs:
    if name not in fields:
      raise BadRequest(f"missing field '{name}' (task '{task}' needs it)")
  for name in ("box", *TEXT_FIELDS):
    if name in fields and name not in needs + may:
      raise BadRequest(f"{name}: task '{task}' does not use it")
  box = parse_box(fields["box"]) if "box" in fields else None
  prompt, bboxes = task_prompt(task, fields, box, num_patches_per_side)
  options = dict(defaults)
  options.update({k: _option(k, v, limits) for k, v in fields.items() if k in OPTIONS})
  if options["do_sample"] and options["num_beams"] > 1:
    raise BadRequest("num_beams: sampling with num_beams > 1 (beam sampling) is not supported")
  image = read_image(fields["image"], limits)
  return Parsed(task, prompt, bboxes, image, options, box)
