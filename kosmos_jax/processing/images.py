"""Image preprocessing for the processor (numpy/PIL), as CLIPImageProcessor does.

KOSMOS-2 inference (reference/kosmos2.md 2.6): RGB, square bicubic resize to
224 (no aspect preservation; the centre crop is then a no-op), rescale by
1/255, normalize with the CLIP mean/std, channels first. The arithmetic follows
transformers' PIL backend step by step (uint8 resize in PIL, rescale in float64
then float32, normalize in float32), so pixel values match it bit for bit.
"""

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """Preprocessing settings, named as in a Hugging Face image processor config.

  `size` is `(height, width)` for a plain resize, or an int for a resize of the
  shortest edge that keeps the aspect ratio.
  """

  size: int | tuple[int, int] = (224, 224)
  crop_size: tuple[int, int] | None = (224, 224)
  resample: int = Image.Resampling.BICUBIC
  rescale_factor: float | None = 1 / 255
  image_mean: tuple[float, ...] | None = CLIP_MEAN
  image_std: tuple[float, ...] | None = CLIP_STD

  def at_size(self, size: int) -> "ImageOptions":
    """These options for a vision tower of `size` x `size` pixels (a model run
    at another resolution than its processor files say): resize and crop to it."""
    return dataclasses.replace(
      self,
      size=size if isinstance(self.size, int) else (size, size),
      crop_size=None if self.crop_size is None else (size, size),
    )

  @classmethod
  def from_hf_config(cls, config: dict[str, Any]) -> "ImageOptions":
    """From a `preprocessor_config.json` dict (or `processor_config.json`'s
    `image_processor` entry)."""
    size = config.get("size", {"height": 224, "width": 224})
    if isinstance(size, int):
      size = {"shortest_edge": size}
    if "shortest_edge" in size:
      # KOSMOS-2's `use_square_size` turns the shortest edge into a square.
      edge = size["shortest_edge"]
      size = (edge, edge) if config.get("use_square_size") else edge
    else:
      size = (size["height"], size["width"])
    crop = config.get("crop_size", {"height": 224, "width": 224})
    crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
    return cls(
      size=size if config.get("do_resize", True) else None,
      crop_size=crop if config.get("do_center_crop", True) else None,
      resample=config.get("resample", Image.Resampling.BICUBIC),
      rescale_factor=config.get("rescale_factor", 1 / 255)
      if config.get("do_rescale", True)
      else None,
      image_mean=tuple(config.get("image_mean", CLIP_MEAN))
      if config.get("do_normalize", True)
      else None,
      image_std=tuple(config.get("image_std", CLIP_STD))
      if config.get("do_normalize", True)
      else None,
    )


def _describe(image, index: int | None) -> str:
  where = "" if index is None else f" #{index}"
  if isinstance(image, (str, os.PathLike)):
    return f"image{where} ({os.fspath(image)!r})"
  return f"image{where} ({type(image).__name__})"


def _open(image, index: int | None) -> Image.Image:
  """A PIL image from a path or encoded bytes, decoded now so errors surface here."""
  source = io.BytesIO(image) if isinstance(image, bytes) else image
  try:
    pil = Image.open(source)
    pil.load()
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {_describe(image, index)}: {e}") from e
  return pil


def to_rgb(image, index: int | None = None) -> np.ndarray:
  """Any supported image as an (H, W, 3) uint8 array.

  Accepts a PIL image (any mode PIL converts to RGB: L, LA, P, PA, RGBA, CMYK,
  YCbCr, I, ...), a path, encoded bytes, or a uint8 array (H, W), (H, W, 1),
  (H, W, 3) or (H, W, 4). Transparency is composited onto white, as
  transformers does.
  """
  if isinstance(image, (str, os.PathLike, bytes)):
    image = _open(image, index)
  if isinstance(image, Image.Image):
    try:
      if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
      return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
      raise ValueError(
        f"cannot convert {_describe(image, index)} in mode {image.mode!r} to RGB: {e}"
      ) from e
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(
        f"{_describe(image, index)} has dtype {image.dtype}; pass uint8 pixels (H, W[, C])"
      )
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ValueError(
        f"{_describe(image, index)} has shape {image.shape}; expected (H, W) or (H, W, 1|3|4)"
      )
    if image.shape[-1] == 1:
      return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
      alpha = image[..., 3:4] / 255
      return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image
  raise ValueError(
    f"unsupported {_describe(image, index)}: expected a PIL image, a uint8 array, a path or bytes"
  )


def _resize(rgb: np.ndarray, size, resample: int) -> np.ndarray:
  height, width = rgb.shape[:2]
  if isinstance(size, int):
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    height, width = (size, new_long) if height <= width else (new_long, size)
  else:
    height, width = size
  return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


def _center_crop(image: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
  """Centre crop of an (H, W, C) array, zero-padding a side that is too small."""
  height, width = image.shape[:2]
  out_h, out_w = crop
  if out_h > height or out_w > width:
    padded = np.zeros((max(out_h, height), max(out_w, width), image.shape[2]), image.dtype)
    top, left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)
    padded[top : top + height, left : left + width] = image
    image, (height, width) = padded, padded.shape[:2]
  top, left = (height - out_h) // 2, (width - out_w) // 2
  return image[top : top + out_h, left : left + out_w]


def preprocess_image(
  image, options: ImageOptions = ImageOptions(), index: int | None = None
) -> np.ndarray:
  """One image as a (3, H, W) float32 array ready for the vision tower."""
  pixels = to_rgb(image, index)
  if options.size is not None:
    pixels = _resize(pixels, options.size, options.resample)
  if options.crop_size is not None:
    pixels = _center_crop(pixels, options.crop_size)
  if options.rescale_factor is not None:
    pixels = (pixels.astype(np.float64) * options.rescale_factor).astype(np.float32)
  else:
    pixels = pixels.astype(np.float32)
  if options.image_mean is not None:
    pixels = (pixels - np.asarray(options.image_mean, np.float32)) / np.asarray(
      options.image_std, np.float32
    )
  return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocess_images(images: Sequence, options: ImageOptions = ImageOptions()) -> np.ndarray:
  """A list of images as an (N, 3, H, W) float32 batch."""
  return np.stack([preprocess_image(im, options, i) for i, im in enumerate(images)])
