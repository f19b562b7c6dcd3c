"""A tiny sentencepiece model and Hugging Face Kosmos-2 processor dir for tests.

The model is trained in a fraction of a second on generated lines. The default
is a unigram model: transformers 5 loads any sentencepiece file as a Unigram
tokenizer, which equals sentencepiece only for unigram models (a BPE file is
tokenized differently there; see tests/data/test_vocab.py).
"""

import os
import random

import sentencepiece as spm

KOSMOS_IMAGE_PROCESSOR = dict(
  do_resize=True,
  size={"shortest_edge": 224},
  use_square_size=True,
  resample=3,
  do_center_crop=True,
  crop_size={"height": 224, "width": 224},
  do_rescale=True,
  rescale_factor=1 / 255,
  do_normalize=True,
  image_mean=[0.48145466, 0.4578275, 0.40821073],
  image_std=[0.26862954, 0.26130258, 0.27577711],
  do_convert_rgb=True,
)
EXTRA_WORDS = (
  "café",
  "naïve",
  "Ünïcödé",
  "東京",
  "123",
  "4.5",
  "?",
  ".",
  ",",
  "!",
  "It",
  "is",
  "a",
)


def lexicon(seed: int = 0, size: int = 3000) -> list[str]:
  """Pronounceable pseudo-words (enough variety for a ~1000-piece model)."""
  rng = random.Random(seed)
  cons, vowels = "bcdfghjklmnprstvwz", "aeiou"
  words = set()
  while len(words) < size:
    w = "".join(
      rng.choice(cons) + rng.choice(vowels) + rng.choice(["", rng.choice(cons)])
      for _ in range(rng.randint(1, 3))
    )
    words.add(w.capitalize() if rng.random() < 0.1 else w)
  return sorted(words) + list(EXTRA_WORDS)


def train_tiny_spm(directory, model_type: str = "unigram", vocab_size: int = 1000) -> str:
  """Trains `directory/sentencepiece.bpe.model`; returns its path."""
  rng = random.Random(1)
  words = lexicon()
  lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(600)]
  prefix = os.path.join(os.fspath(directory), "sentencepiece.bpe")
  os.makedirs(os.fspath(directory), exist_ok=True)
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines),
    model_prefix=prefix,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=1.0,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  return prefix + ".model"


def hf_processor(directory, padding_side: str = "right"):
  """transformers' Kosmos2Processor on the sentencepiece model in `directory`."""
  from transformers import CLIPImageProcessor, Kosmos2Processor, XLMRobertaTokenizer

  # XLMRobertaTokenizer(vocab_file=...) silently builds a 5-token vocabulary in
  # transformers 5; from_pretrained(dir) converts the sentencepiece file.
  tokenizer = XLMRobertaTokenizer.from_pretrained(os.fspath(directory))
  tokenizer.padding_side = padding_side
  return Kosmos2Processor(
    image_processor=CLIPImageProcessor(**KOSMOS_IMAGE_PROCESSOR), tokenizer=tokenizer
  )


def make_tiny_processor_dir(directory, model_type: str = "unigram") -> str:
  """Writes a full Hugging Face Kosmos-2 processor directory (tiny vocabulary:
  1000 pieces + <mask> + 11 tags + 1024 patch tokens = 2037 ids); returns it."""
  train_tiny_spm(directory, model_type)
  # save_pretrained writes tokenizer.json, tokenizer_config.json and
  # processor_config.json; the sentencepiece model is already there, as on the hub.
  hf_processor(directory).save_pretrained(os.fspath(directory))
  return os.fspath(directory)


def make_tiny_snapshot(directory) -> str:
  """Writes a Hugging Face Kosmos-2 snapshot directory like the hub's: the
  processor files plus a random-weight model (save_pretrained) at the real
  image size whose vocabulary covers the processor's ids; returns it."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from kosmos_jax.processing.processor import Processor  # pylint: disable=g-import-not-at-top

  make_tiny_processor_dir(directory)
  vocab_size = Processor.from_pretrained(directory).vocab.vocab_size
  config = transformers.Kosmos2Config(
    text_config=dict(embed_dim=64, layers=2, attention_heads=4, ffn_dim=128, vocab_size=vocab_size),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=4,
      image_size=224,
      patch_size=14,
    ),
    latent_query_num=64,
  )
  # Seeded: unseeded, the weights followed whatever the worker's earlier tests
  # drew, and under pytest-xdist that order changes from run to run.
  torch.manual_seed(0)
  transformers.Kosmos2ForConditionalGeneration(config).save_pretrained(os.fspath(directory))
  return os.fspath(directory)


def write_snowman(path, size=(320, 240)) -> str:
  """A small picture of a snowman (two white discs on blue), in the format the
  file name says (.jpg, .png, ...); returns the path."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  width, height = size
  picture = Image.new("RGB", size, (90, 140, 220))
  draw = ImageDraw.Draw(picture)
  draw.ellipse([width * 0.35, height * 0.45, width * 0.65, height * 0.95], fill="white")
  draw.ellipse([width * 0.40, height * 0.15, width * 0.60, height * 0.48], fill="white")
  picture.save(path)
  return os.fspath(path)


def random_box(rng: random.Random):
  """A box in one of the forms the processor takes: 4 floats or a pair of
  patch indices; some floats sit exactly on the 32-cell grid."""
  if rng.random() < 0.3:
    ul = rng.randrange(1024)
    return (ul, rng.randrange(ul, 1024))
  grid = rng.random() < 0.3
  coords = []
  for _ in range(2):
    a, b = sorted(rng.sample(range(33), 2)) if grid else sorted((rng.random(), rng.random()))
    coords.append((a / 32, b / 32) if grid else (a, b + 1e-3 if b - a < 1e-3 else b))
  (x1, x2), (y1, y2) = coords
  return (float(x1), float(y1), float(min(x2, 1.0)), float(min(y2, 1.0)))


def random_grounded_example(rng: random.Random, words=None):
  """`(text, bboxes)`: words with 0-3 `<phrase>..</phrase>` spans, odd
  whitespace (no newline inside a phrase: transformers' phrase regex stops
  there), and per phrase None, [], a box or a list of boxes."""
  words = words or lexicon()
  space = lambda: rng.choice([" ", " ", " ", "", "  ", "\t", "\n "])
  say = lambda n, sep=space: sep().join(rng.choice(words) for _ in range(n))
  parts, boxes = [rng.choice(["", "<grounding>", "<grounding> ", " <grounding>"])], []
  for _ in range(rng.randint(0, 3)):
    parts.append(say(rng.randint(0, 4)) + space())
    parts.append(
      f"<phrase>{rng.choice(['', ' '])}"
      f"{say(rng.randint(1, 3), lambda: rng.choice([' ', '  ']))}</phrase>" + space()
    )
    kind = rng.random()
    boxes.append(
      None
      if kind < 0.15
      else []
      if kind < 0.2
      else random_box(rng)
      if kind < 0.6
      else [random_box(rng) for _ in range(rng.randint(1, 3))]
    )
  parts.append(say(rng.randint(0, 5)) + rng.choice(["", ".", " .", "?"]))
  return "".join(parts), (boxes or None)
