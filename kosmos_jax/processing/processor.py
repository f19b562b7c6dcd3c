"""A KOSMOS-2 processor with the inputs and outputs of transformers' Kosmos2Processor.

Text construction (reference/kosmos2.md 2.2): `<s>` + `<image>` + 64 slots +
`</image>` + the stripped text with boxes inserted after each phrase; the 64
slot ids are replaced by 4..67 and flagged in `image_embeds_position_mask`.
Batches with images are padded to the longest sequence, as transformers does.
Everything comes back as numpy arrays.

Other modalities (PandaGPT-style soft tokens, models/modalities.py): a
processor with `modalities` (name -> vector width) expands each `<name>`
placeholder into `<name>`, `modality_tokens` slot ids and `</name>`, marks
those slots 2 in `image_embeds_position_mask`, and returns the vectors as
`modality_embeds` / `modality_types` (the layout of models/batch.py).
"""

import json
import math
import numbers
import os
import re
from collections.abc import Sequence

import numpy as np

from kosmos_jax.processing import files, grounding
from kosmos_jax.processing import images as images_lib
from kosmos_jax.processing import modalities as modalities_lib
from kosmos_jax.processing import views as views_lib
from kosmos_jax.processing import vocab as vocab_lib

_PHRASE_RE = re.compile(r"<phrase>.+?</phrase>")
IMAGE = "<image>"  # in a text: where an image goes (interleaved inputs)
# transformers' `clean_up_tokenization`, applied on decode when the tokenizer
# config asks for it.
_CLEANUPS = (
  (" .", "."),
  (" ?", "?"),
  (" !", "!"),
  (" ,", ","),
  (" ' ", "'"),
  (" n't", "n't"),
  (" 'm", "'m"),
  (" 's", "'s"),
  (" 've", "'ve"),
  (" 're", "'re"),
)


def few_shot_prompt(demonstrations, image, prompt: str) -> tuple[str, list]:
  """KOSMOS-1's in-context input: `<image> {text} ... <image> {prompt}` and its
  images, the (image, text) demonstrations first, in order."""
  parts = [f"{IMAGE} {text.strip()}" for _, text in demonstrations]
  parts.append(f"{IMAGE} {prompt.strip()}")
  return " ".join(parts), [im for im, _ in demonstrations] + [image]


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _is_box(box) -> bool:
  """A location pair (2 ints) or normalized coordinates (4 floats), as a tuple."""
  if not isinstance(box, tuple):
    return False
  if len(box) == 2:
    return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box)
  return len(box) == 4 and all(
    isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) for v in box
  )


def _check_boxes(boxes, where: str):
  """`boxes` for one text: None, or one entry per phrase that is None, a box,
  or a list of boxes."""
  if boxes is None:
    return
  if not isinstance(boxes, list):
    raise ValueError(
      f"bboxes{where} must be None or a list with one entry per <phrase>, "
      f"got {type(boxes).__name__}"
    )
  for entry in boxes:
    for box in [] if entry is None else entry if isinstance(entry, list) else [entry]:
      if not _is_box(box):
        raise ValueError(
          f"bboxes{where}: {box!r} is not a box; use a tuple of 2 ints (patch indices) "
          "or of 4 floats (x1, y1, x2, y2), a list of such tuples, or None"
        )


def _model_config(directory: str) -> dict:
  """The model config of one of our checkpoints in `directory` (a converted
  checkpoint's `kosmos_config.json`, a trainer workdir's `config.json`
  "model"), or {}. Read as JSON: checkpoints/ sits above this package."""
  converted = _read_json(os.path.join(directory, "kosmos_config.json"))
  return converted or _read_json(os.path.join(directory, "config.json")).get("model") or {}


def _pad(rows: list[list[int]], value: int, length: int, side: str) -> np.ndarray:
  pad = lambda r: [value] * (length - len(r))
  return np.array([pad(r) + r if side == "left" else r + pad(r) for r in rows], np.int64)


class Processor:
  """Turns text, images and boxes into model inputs, and generated ids back."""

  def __init__(
    self,
    vocab: vocab_lib.KosmosVocabulary,
    image_options: images_lib.ImageOptions = images_lib.ImageOptions(),
    num_image_tokens: int = vocab_lib.NUM_IMAGE_TOKENS,
    padding_side: str = "right",
    clean_up_tokenization_spaces: bool = False,
    modalities: dict[str, int] | None = None,
    modality_tokens: int = 4,
  ):
    """`modalities`: name -> vector width of the model's other modalities
    (its `model.modalities`), `modality_tokens` its soft tokens per item; the
    vocabulary is rebuilt with their tags unless it has them."""
    # Sorted: a modality's tags and type id follow its place in sorted(names).
    self.modalities = {name: int(modalities[name]) for name in sorted(modalities or {})}
    self.modality_tokens = int(modality_tokens)
    if vocab.modalities != tuple(self.modalities):
      if vocab.modalities and not self.modalities:
        raise ValueError(
          f"the vocabulary has modalities {vocab.modalities}: pass modalities= "
          "(name -> vector width) to the Processor"
        )
      vocab = vocab_lib.KosmosVocabulary(
        vocab.sentencepiece_model_file,
        num_patches_per_side=vocab.num_patches_per_side,
        extra_ids=vocab.extra_ids,
        modalities=tuple(self.modalities),
      )
    self.vocab = vocab
    self.image_options = image_options
    self.num_image_tokens = num_image_tokens
    self.padding_side = padding_side
    self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

  @classmethod
  def from_pretrained(
    cls,
    directory: str | os.PathLike,
    image_size: int | None = None,
    modalities: dict[str, int] | None = None,
    modality_tokens: int | None = None,
    views: dict | None = None,
  ) -> "Processor":
    """Reads a Hugging Face Kosmos-2 processor directory.

    Needs `sentencepiece.bpe.model`; reads `tokenizer_config.json` (padding
    side, decode clean-up) and the image settings from `processor_config.json`
    (transformers 5) or `preprocessor_config.json` (hub snapshots).
    `image_size`: the model's `vision.image_size` when it differs from the
    files' (e.g. 448 on the 224 release): pictures are resized to it instead.
    `modalities` / `modality_tokens`: default to the model config's when the
    directory is one of our checkpoints (a model without modalities: none).
    `views` ({"grid": N, "global": bool}, processing/views.py): likewise;
    pictures are then resized to N x `image_size` and each takes the
    views' slots (e.g. {"grid": 2, "global": True} on the 224 release: 448
    px, 5 x (64 + 2) slots, for `from_pretrained(..., vision={"views": ...})`).
    """
    directory = os.fspath(directory)
    spm_file = os.path.join(directory, files.SENTENCEPIECE)
    if not os.path.exists(spm_file):
      raise FileNotFoundError(
        f"{spm_file} not found: a Kosmos-2 processor directory needs the sentencepiece model"
      )
    processor_config = _read_json(os.path.join(directory, "processor_config.json"))
    image_config = processor_config.get("image_processor") or _read_json(
      os.path.join(directory, "preprocessor_config.json")
    )
    tokenizer_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    num_patches = processor_config.get("num_patch_index_tokens", 1024)
    vocab = vocab_lib.KosmosVocabulary(spm_file, num_patches_per_side=math.isqrt(num_patches))
    image_options = images_lib.ImageOptions.from_hf_config(image_config)
    model = _model_config(directory)
    num_image_tokens = processor_config.get("num_image_tokens", vocab_lib.NUM_IMAGE_TOKENS)
    vision = dict(model.get("vision") or {})
    vision.update({} if views is None else {"views": views})
    if views_lib.tagged(vision):  # SPHINX's views: N x the towers' side, their slots
      side = image_size or vision.get("image_size") or image_options.crop_size[0]
      image_size = views_lib.input_size(dict(vision, image_size=side))
      latents = model.get("latent_query_num", num_image_tokens)
      num_image_tokens = views_lib.image_slots({"latent_query_num": latents, "vision": vision})
    processor = cls(
      vocab,
      image_options=image_options if image_size is None else image_options.at_size(image_size),
      num_image_tokens=num_image_tokens,
      padding_side=tokenizer_config.get("padding_side", "right"),
      clean_up_tokenization_spaces=tokenizer_config.get("clean_up_tokenization_spaces", False),
      modalities=model.get("modalities") if modalities is None else modalities,
      modality_tokens=model.get("modality_tokens", 4)
      if modality_tokens is None
      else modality_tokens,
    )
    if model.get("text"):
      processor.check_model_vocab(model["text"]["vocab_size"])
    return processor

  def check_model_vocab(self, vocab_size: int) -> None:
    """A clear ValueError when a model with `vocab_size` text rows cannot
    read this processor's ids: with modalities, their tags must be the
    model's last rows (models.config.with_modalities grows it so)."""
    if not self.modalities:
      return
    first = self.vocab.modality_tag_ids(next(iter(self.modalities)))[0]
    if vocab_size != first + 2 * len(self.modalities):
      raise ValueError(
        f"model text.vocab_size {vocab_size}: the tags of modalities "
        f"{list(self.modalities)} are ids {first}..{first + 2 * len(self.modalities) - 1} "
        f"here, so the model needs exactly {first + 2 * len(self.modalities)} rows "
        "(models.config.with_modalities on a config sized for this vocabulary)"
      )

  # --- text ----------------------------------------------------------------

  def insert_boxes(self, text: str, boxes) -> str:
    """Appends `<object>..</object>` after the i-th `<phrase>..</phrase>` for
    `boxes[i]` (None or an empty list: no object)."""
    if not boxes:
      return text
    phrases = list(_PHRASE_RE.finditer(text))
    if len(phrases) != len(boxes):
      raise ValueError(
        f"{len(boxes)} bboxes entries for {len(phrases)} <phrase>..</phrase> pairs in {text!r}"
      )
    out, pos = [], 0
    for match, entry in zip(phrases, boxes):
      out.append(text[pos : match.end()])
      pos = match.end()
      entry = [entry] if isinstance(entry, tuple) else entry
      if entry:
        out.append(grounding.object_markup(entry, self.vocab.num_patches_per_side))
    out.append(text[pos:])
    return "".join(out)

  def prompt_text(self, text: str, num_images: int, boxes=None) -> str:
    """The string the tokenizer sees (without `<s>`).

    Each `<image>` placeholder of `text` becomes `<image>`, the image's slots
    and `</image>`; a text without placeholders and one image gets it first
    (transformers' layout). `num_images` must match the placeholders.
    """
    text = text.strip()
    if num_images == 1 and IMAGE not in text:
      text = f"{IMAGE} {text}"
    if text.count(IMAGE) != num_images:
      raise ValueError(
        f"{text.count(IMAGE)} {IMAGE} placeholders for {num_images} images in {text!r}"
      )
    block = " ".join([IMAGE] * (self.num_image_tokens + 1) + ["</image>"])
    return self.insert_boxes(text.replace(IMAGE, block), boxes)

  def _slot_mask(self, ids: list[int]) -> list[int]:
    """1 at each image's slots (the ids after an `<image>` tag and before its
    `</image>`), which get the slot ids; `ids` is changed in place."""
    n, open_id, close_id = (
      self.num_image_tokens,
      self.vocab.tag_id(IMAGE),
      self.vocab.tag_id("</image>"),
    )
    mask, i = [0] * len(ids), 0
    while i < len(ids):
      if (
        ids[i] == open_id
        and ids[i + 1 : i + n + 1] == [open_id] * n
        and (i + n + 1 < len(ids) and ids[i + n + 1] == close_id)
      ):
        ids[i + 1 : i + n + 1] = vocab_lib.image_slot_ids(n)
        mask[i + 1 : i + n + 1] = [1] * n
        i += n + 2
      else:
        i += 1
    return mask

  def expand_modalities(self, text: str, counts: dict[str, int] | None = None) -> str:
    """`text` with each modality placeholder `<name>` expanded into its tags
    and slots; `counts` (vectors per name) must match the placeholders."""
    return modalities_lib.expand(text, self.modalities, self.modality_tokens, counts)

  def _stacked_pixels(self, per_text: list[list]) -> np.ndarray:
    """(N, max images, 3, H, W): each text's images, zero images after them."""
    width = max(map(len, per_text))
    if not width:
      raise ValueError("interleaved inputs need at least one image")
    pixels = [images_lib.preprocess_images(e, self.image_options) if e else None for e in per_text]
    shape = next(p for p in pixels if p is not None).shape[1:]
    return np.stack(
      [
        np.concatenate(
          [
            p if p is not None else np.zeros((0, *shape), np.float32),
            np.zeros((width - len(e), *shape), np.float32),
          ]
        )
        for p, e in zip(pixels, per_text)
      ]
    )

  # --- call ----------------------------------------------------------------

  def __call__(
    self,
    text: str | Sequence[str] | None = None,
    images=None,
    bboxes=None,
    padding: bool | str = False,
    padding_side: str | None = None,
    add_eos_token: bool = False,
    add_special_tokens: bool = True,
    modalities=None,
  ) -> dict[str, np.ndarray]:
    """Model inputs as numpy arrays.

    Args:
      text: a string or a list of strings.
      images: an image, a list of images (one per text), or a list of lists
        (each text's images, in the order of its `<image>` placeholders:
        interleaved text and images, "<image> A duck. <image> A"); see
        `images_lib.to_rgb` for the accepted kinds.
      bboxes: for one text, a list with one entry per `<phrase>`: None, a box
        (tuple of 2 ints = patch indices, or 4 floats = normalized x1, y1, x2,
        y2) or a list of boxes; for a batch, a list of those (or None).
      padding: pad a text-only batch to its longest row (True or "longest");
        batches with images are always padded, as in transformers.
      padding_side: "left" or "right"; default from the tokenizer config.
      add_eos_token: end with `</s>`.
      add_special_tokens: start with `<s>` (and allow `</s>`).
      modalities: other-modality vectors for the text's `<name>`
        placeholders: a list of (name, vector) pairs or a dict {name:
        [vectors]} (each modality's vectors in the order of its
        placeholders); for a batch, a list of those (or None) per text.

    Returns:
      `input_ids`, `attention_mask` (int64, (B, L); B = 1 for a single
      string, as transformers' `return_tensors="np"` gives), with images also
      `image_embeds_position_mask` and `pixel_values` (float32, (N, 3, H, W),
      or (N, max images, 3, H, W) when a text has `<image>` placeholders or
      images come as lists; a row with fewer images is padded with zero
      images, which no slot reads). With `modalities`, also
      `modality_embeds` (float32, (B, M, D): each row's vectors in slot
      order, zero-padded to the widest modality) and `modality_types`
      (int32, (B, M): index in sorted modality names, -1 after a row's
      items), and 2 on their slots in `image_embeds_position_mask`.
    """
    if text is None and images is None:
      raise ValueError("pass text, images or both")
    if text is None and modalities is not None:
      raise ValueError("modalities need a text with their <name> placeholders")
    out = {}
    if images is not None:
      image_list = images if isinstance(images, list) else [images]
      strings = [text] if isinstance(text, str) else list(text or [])
      interleaved = any(isinstance(e, list) for e in image_list) or any(IMAGE in t for t in strings)
      if interleaved and isinstance(text, str) and not isinstance(image_list[0], list):
        image_list = [image_list]  # one text: the list is its images
      per_text = [e if isinstance(e, list) else [e] for e in image_list]
      if interleaved:
        out["pixel_values"] = self._stacked_pixels(per_text)
      else:
        out["pixel_values"] = images_lib.preprocess_images(image_list, self.image_options)
    if text is None:
      return out

    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if single:
      _check_boxes(bboxes, "")
      box_lists = [bboxes]
    elif bboxes is None:
      box_lists = [None] * len(texts)
    else:
      if not isinstance(bboxes, list) or len(bboxes) != len(texts):
        raise ValueError(f"bboxes must be None or a list with one entry per text ({len(texts)})")
      for i, b in enumerate(bboxes):
        _check_boxes(b, f"[{i}]")
      box_lists = bboxes
    if images is not None and len(image_list) != len(texts):
      raise ValueError(
        f"got {len(texts)} texts and {len(image_list)} images; pass one image per text"
      )
    check = lambda entry, where: modalities_lib.vectors_by_name(entry, self.modalities, where)
    if single:
      vectors = [check(modalities, "")]
    elif modalities is None:
      vectors = [{}] * len(texts)
    else:
      if not isinstance(modalities, list) or len(modalities) != len(texts):
        raise ValueError(
          f"modalities must be None or a list with one entry per text ({len(texts)})"
        )
      vectors = [check(e, f"[{i}]") for i, e in enumerate(modalities)]

    with_bos = add_special_tokens
    rows = []
    for i, (t, b) in enumerate(zip(texts, box_lists)):
      prompt = self.prompt_text(t, 0 if images is None else len(per_text[i]), b)
      counts = {name: len(v) for name, v in vectors[i].items()}
      ids = self.vocab.encode(self.expand_modalities(prompt, counts))
      if with_bos:
        ids = [self.vocab.bos_id] + ids
      if add_special_tokens and add_eos_token:
        ids.append(self.vocab.eos_id)
      rows.append(ids)

    image_masks = None
    if images is not None:
      image_masks = [self._slot_mask(ids) for ids in rows]
    if modalities is not None and self.modalities:
      slots = (
        modalities_lib.slot_mask(ids, self.vocab, self.modalities, self.modality_tokens)
        for ids in rows
      )
      masks, items = zip(*slots)
      out["modality_embeds"], out["modality_types"] = modalities_lib.stack(
        vectors, items, self.modalities
      )
      # Image (1) and modality (2) slots never overlap.
      image_masks = [
        [a + b for a, b in zip(image, modal)]
        for image, modal in zip(image_masks or [[0] * len(r) for r in rows], masks)
      ]

    side = padding_side or self.padding_side
    if side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    length = max(map(len, rows))
    if (image_masks is None and not padding) and len(set(map(len, rows))) > 1:
      raise ValueError("texts encode to different lengths; pass padding=True to get arrays")
    out["input_ids"] = _pad(rows, self.vocab.pad_id, length, side)
    out["attention_mask"] = _pad([[1] * len(r) for r in rows], 0, length, side)
    if image_masks is not None:
      out["image_embeds_position_mask"] = _pad(image_masks, 0, length, side)
    return out

  # --- output --------------------------------------------------------------

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Ids to text, as the Hugging Face tokenizer's `decode`."""
    text = self.vocab.detokenize(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens)
    if self.clean_up_tokenization_spaces:
      for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text

  def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
    return [self.decode(ids, skip_special_tokens) for ids in sequences]

  def post_process_generation(self, text: str, cleanup_and_extract: bool = True):
    """Caption after `</image>`; with `cleanup_and_extract`, `(clean_text,
    [(phrase, (start, end), [(x1, y1, x2, y2), ...]), ...])`."""
    return grounding.post_process_generation(
      text, cleanup_and_extract, self.vocab.num_patches_per_side
    )

  def answer(self, prompt_ids, new_ids) -> dict:
    """One generated row as JSON-ready parts: the new ids up to and with the
    first `</s>` (or without the padding after a stop), and the `text` and
    `entities` ({phrase, span, boxes}) of prompt + answer, as transformers'
    demo post-processes them (a REG answer keeps its boxed "It")."""
    new = [int(i) for i in new_ids]
    if self.vocab.eos_id in new:
      new = new[: new.index(self.vocab.eos_id) + 1]
    while new and new[-1] == self.vocab.pad_id:
      new.pop()
    decoded = self.decode([int(i) for i in prompt_ids] + new, skip_special_tokens=True)
    text, entities = self.post_process_generation(decoded)
    return dict(
      text=text,
      entities=[
        dict(phrase=phrase, span=list(span), boxes=[list(b) for b in boxes])
        for phrase, span, boxes in entities
      ],
      new_ids=new,
    )
