"""Grounded output as a picture: each entity's boxes drawn and labelled with its phrase."""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, readable on light and dark backgrounds.
_COLORS = (
  (230, 25, 75),
  (60, 180, 75),
  (0, 130, 200),
  (245, 130, 48),
  (145, 30, 180),
  (70, 240, 240),
  (240, 50, 230),
  (210, 245, 60),
  (250, 190, 212),
  (0, 128, 128),
)

Entity = tuple[str, tuple[int, int], Sequence[tuple[float, float, float, float]]]


def draw_entities(
  image, entities: Sequence[Entity], *, min_size: int = 224, line_width: int | None = None
) -> Image.Image:
  """Draws `entities` — `(phrase, span, [(x1, y1, x2, y2), ...])` with
  coordinates in [0, 1], as `post_process_generation` returns them — on a copy
  of `image` (PIL image or HWC uint8 array). Small images are upscaled to
  `min_size` first so that labels stay legible."""
  picture = (
    Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
  ).convert("RGB")
  if min(picture.size) < min_size:
    scale = min_size / min(picture.size)
    picture = picture.resize(
      (round(picture.width * scale), round(picture.height * scale)), Image.Resampling.NEAREST
    )
  width, height = picture.size
  line_width = line_width or max(2, round(min(width, height) / 150))
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  for i, (phrase, _, boxes) in enumerate(entities):
    color = _COLORS[i % len(_COLORS)]
    for x1, y1, x2, y2 in boxes:
      box = [x1 * width, y1 * height, max(x1, x2) * width, max(y1, y2) * height]
      draw.rectangle(box, outline=color, width=line_width)
      label = phrase.strip() or "?"
      left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
      # Above the box's left corner, moved left where it would leave the picture.
      tx = max(0.0, min(box[0], width - (right - left) - 4))
      ty = max(0.0, box[1] - (bottom - top) - 4)
      draw.rectangle([tx, ty, tx + right - left + 4, ty + bottom - top + 4], fill=color)
      draw.text((tx + 2, ty + 2 - top), label, fill=(255, 255, 255), font=font)
  return picture


def draw_strip(
  images: Sequence, captions: Sequence[str], *, size: int = 192, colors: Sequence | None = None
) -> Image.Image:
  """Images side by side, each upscaled to `size` px with its caption below
  (wrapped to the image's width): an interleaved prompt as one picture.
  `colors`: each caption's RGB colour (default black)."""
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line_height = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
  wrapped = [_wrap(probe, text, font, size - 8) for text in captions]
  height = size + 8 + line_height * max(len(lines) for lines in wrapped)
  strip = Image.new("RGB", (len(images) * (size + 8) + 8, height + 8), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for i, (image, lines) in enumerate(zip(images, wrapped)):
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    left = 8 + i * (size + 8)
    strip.paste(picture.resize((size, size), Image.Resampling.NEAREST), (left, 8))
    color = tuple(colors[i]) if colors else (0, 0, 0)
    for k, line in enumerate(lines):
      draw.text((left + 4, size + 12 + k * line_height), line, fill=color, font=font)
  return strip


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
  lines = [""]
  for word in text.split():
    candidate = f"{lines[-1]} {word}".strip()
    if lines[-1] and draw.textlength(candidate, font=font) > width:
      lines.append(word)
    else:
      lines[-1] = candidate
  return lines
