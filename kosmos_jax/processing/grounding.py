"""Boxes <-> location tokens, grounded-text rendering and entity extraction.

Formulas: reference/kosmos2.md 2.3 (box -> pair), 2.4 (pair -> box), 2.5
(entity extraction, with the exact behaviour of transformers'
`clean_text_and_extract_entities_with_bboxes`), 2.7 (REG prompt).
Boxes are normalized `(x1, y1, x2, y2)` in [0, 1]; a location pair is the
row-major index of the upper-left and of the lower-right grid cell.
"""

import math
import re
from collections.abc import Sequence

from kosmos_jax.processing.vocab import patch_index_token

Box = tuple[float, float, float, float]
Entity = tuple[str, tuple[int, int], list[Box]]

# A run of location pairs inside <object>..</object>, optionally preceded by
# its phrase (the phrase may not contain "<").
_ENTITY_RE = re.compile(
  r"(?:(<phrase>([^<]+)</phrase>))?<object>"
  r"((?:<patch_index_\d+><patch_index_\d+></delimiter_of_multi_objects/>)*"
  r"<patch_index_\d+><patch_index_\d+>)</object>"
)
_PATCH_RE = re.compile(r"<patch_index_(\d+)>")
# Anything in angle brackets is markup; like transformers, "." stops at "\n".
_MARKUP_RE = re.compile(r"<.*?>")
# Longer location numbers overflow the float box math (transformers raises).
_MAX_DIGITS = 300


def box_to_patch_indices(
  box: Sequence[float], num_patches_per_side: int = 32, quantizer: str = "hf"
) -> tuple[int, int]:
  """Quantizes a normalized box to (upper-left cell, lower-right cell).

  Args:
    box: `(x1, y1, x2, y2)` with x2 > x1 and y2 > y1.
    num_patches_per_side: P.
    quantizer: "hf" (transformers' `coordinate_to_patch_index`, the processor's
      rule) or "original" (the training code's `get_box_coords_index`, which
      clamps to the image and differs when x2 * P is an integer).
  """
  x1, y1, x2, y2 = box
  if not (x2 > x1 and y2 > y1):
    raise ValueError(f"box {tuple(box)} must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1")
  p = num_patches_per_side
  if quantizer == "hf":
    ul_x, ul_y = math.floor(x1 * p), math.floor(y1 * p)
    lr_x, lr_y = math.ceil(x2 * p - 1), math.ceil(y2 * p - 1)
  elif quantizer == "original":
    cell = 1 / p
    ul_x, ul_y = math.floor(max(x1, 0) / cell), math.floor(max(y1, 0) / cell)
    lr_x, lr_y = math.floor(min(x2, 0.99999) / cell), math.floor(min(y2, 0.99999) / cell)
  else:
    raise ValueError(f"quantizer must be 'hf' or 'original', got {quantizer!r}")
  return ul_y * p + ul_x, lr_y * p + lr_x


def patch_indices_to_box(ul: int, lr: int, num_patches_per_side: int = 32) -> Box:
  """Box of a location pair: cell centres, or cell borders when the two cells
  share a row or a column (the box would otherwise have no area)."""
  cell = 1.0 / num_patches_per_side
  ul_x, ul_y = ul % num_patches_per_side, ul // num_patches_per_side
  lr_x, lr_y = lr % num_patches_per_side, lr // num_patches_per_side
  if ul == lr or ul_x == lr_x or ul_y == lr_y:
    return ul_x * cell, ul_y * cell, lr_x * cell + cell, lr_y * cell + cell
  half = cell / 2
  return ul_x * cell + half, ul_y * cell + half, lr_x * cell + half, lr_y * cell + half


def _as_pair(box, num_patches_per_side: int, quantizer: str) -> tuple[int, int]:
  """A box given either as a location pair (2 ints) or as 4 coordinates."""
  if len(box) == 2:
    return int(box[0]), int(box[1])
  return box_to_patch_indices(box, num_patches_per_side, quantizer)


def object_markup(boxes: Sequence, num_patches_per_side: int = 32, quantizer: str = "hf") -> str:
  """`<object><patch_index_a><patch_index_b>[</delimiter_of_multi_objects/>..]</object>`.

  Each box is a location pair `(ul, lr)` or normalized `(x1, y1, x2, y2)`.
  """
  if not boxes:
    raise ValueError("object_markup needs at least one box")
  pairs = (_as_pair(b, num_patches_per_side, quantizer) for b in boxes)
  locations = "</delimiter_of_multi_objects/>".join(
    patch_index_token(ul) + patch_index_token(lr) for ul, lr in pairs
  )
  return f"<object>{locations}</object>"


def phrase_markup(
  phrase: str, boxes: Sequence, num_patches_per_side: int = 32, quantizer: str = "hf"
) -> str:
  """`<phrase>{phrase}</phrase>` followed by its `object_markup` (if any boxes)."""
  text = f"<phrase>{phrase}</phrase>"
  return text + object_markup(boxes, num_patches_per_side, quantizer) if boxes else text


def render_grounded_text(
  text: str,
  spans: Sequence[tuple[int, int, Sequence]],
  num_patches_per_side: int = 32,
  quantizer: str = "hf",
) -> str:
  """Marks up character spans of `text` as grounded phrases.

  Args:
    text: plain text.
    spans: `(start, end, boxes)` per phrase, non-overlapping; `boxes` as in
      `object_markup` (empty: phrase without a box).
    num_patches_per_side: P.
    quantizer: see `box_to_patch_indices`.

  Returns:
    The text with `<phrase>..</phrase><object>..</object>` around each span. As
    in KOSMOS-2's data, a space right before a phrase moves inside `<phrase>`
    (`of<phrase> a snowman</phrase>`), which tokenizes the same as the
    processor's output.
  """
  out, pos = [], 0
  for start, end, boxes in sorted(spans, key=lambda s: s[0]):
    if start < pos or end < start:
      raise ValueError(f"span ({start}, {end}) overlaps another or is reversed")
    lead = start
    while lead > pos and text[lead - 1] == " ":
      lead -= 1
    out.append(text[pos:lead])
    out.append(phrase_markup(text[lead:end], boxes, num_patches_per_side, quantizer))
    pos = end
  out.append(text[pos:])
  return "".join(out)


def reg_prompt(
  box, num_patches_per_side: int = 32, phrase: str = " It", continuation: str = " is"
) -> str:
  """Referring-expression-generation prompt for one box (reference 2.7):
  `<phrase> It</phrase><object><patch_index_AAAA><patch_index_BBBB></object> is`."""
  return phrase_markup(phrase, [box], num_patches_per_side) + continuation


def _parse_pairs(locations: str) -> list[tuple[int, int]]:
  pairs = []
  for pair in locations.split("</delimiter_of_multi_objects/>"):
    digits = _PATCH_RE.findall(pair)
    # Both numbers of a pair always match; a pair with absurdly long numbers
    # (on which transformers raises) is dropped instead.
    if len(digits) == 2 and max(map(len, digits)) <= _MAX_DIGITS:
      pairs.append((int(digits[0]), int(digits[1])))
  return pairs


def extract_entities_with_patch_indices(
  text: str,
) -> list[tuple[str, tuple[int, int], list[tuple[int, int]]]]:
  """Entities as `(phrase, span in text, [(ul, lr), ...])`, spans in raw text.

  An `<object>` without a phrase yields one entity per pair, named
  `<patch_index_{ul}><patch_index_{lr}>`, with an empty span at `<object>`.
  """
  entities = []
  for m in _ENTITY_RE.finditer(text):
    pairs = _parse_pairs(m.group(3))
    if m.group(1):
      entities.append((m.group(2), m.span(2), pairs))
    else:
      at = (m.start(), m.start())
      entities += [(f"<patch_index_{ul}><patch_index_{lr}>", at, [(ul, lr)]) for ul, lr in pairs]
  return entities


def clean_text_and_extract_entities(
  text: str, num_patches_per_side: int = 32
) -> tuple[str, list[Entity]]:
  """Removes markup and returns `(clean_text, [(phrase, (start, end), boxes)])`.

  Spans index `clean_text`; the clean text and the phrases are stripped of
  surrounding whitespace. Never raises, whatever the markup.
  """
  clean = _MARKUP_RE.sub("", text)
  offset = len(clean) - len(clean.lstrip())
  entities = []
  for name, (start, end), pairs in extract_entities_with_patch_indices(text):
    # Positions in the clean text; the prefix is cleaned on its own, exactly as
    # transformers does (a cut inside "<...>" changes what is removed).
    start = len(_MARKUP_RE.sub("", text[:start])) - offset + len(name) - len(name.lstrip())
    end = len(_MARKUP_RE.sub("", text[:end])) - offset - (len(name) - len(name.rstrip()))
    boxes = [patch_indices_to_box(ul, lr, num_patches_per_side) for ul, lr in pairs]
    entities.append((name.strip(), (start, end), boxes))
  return clean.strip(), entities


def post_process_generation(
  text: str, cleanup_and_extract: bool = True, num_patches_per_side: int = 32
):
  """The generated caption after the last `</image>`; with `cleanup_and_extract`
  its `clean_text_and_extract_entities` instead."""
  caption = text.split("</image>")[-1]
  if not cleanup_and_extract:
    return caption
  return clean_text_and_extract_entities(caption, num_patches_per_side)
