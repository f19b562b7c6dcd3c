"""`kosmos_shapes`: a synthetic, deterministic TFDS dataset of coloured shapes.

Each example is a picture of 1 to 3 non-overlapping shapes (circle, square,
triangle in red, green, blue or yellow; every colour-shape pair at most once per
picture, so "the red circle" names one object) on a light background (solid or
gradient, with noise), in the GrIT record schema plus two extras:

  key, image (JPEG), width, height
  caption      "an image of a red circle at the top left and a blue square at the bottom."
  noun_chunks  [n, 7] (start, end, x1, y1, x2, y2, score=1) over "a red circle"
  ref_exps     [n, 7] over "a red circle at the top left"
  objects      {expression: "the red circle", bbox: [x1, y1, x2, y2]} per shape
  description  text about the layout ("the red circle is left of the blue square.")

Boxes are normalized and tight. Splits: train and test (held out: other seeds).
Builder configs set the image size ("224", "64", "32") and split sizes;
generation draws with numpy and encodes with PIL (thousands per minute per core).
`shapes_vocabulary()` trains a small sentencepiece model on the dataset's words,
deterministically, into a cache directory on first use.
"""

import contextlib
import dataclasses
import fcntl
import io
import os
import tempfile

import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from kosmos_jax.processing import vocab as vocab_lib

SHAPES = ("circle", "square", "triangle")
COLOURS = {
  "red": (220, 30, 30),
  "green": (30, 160, 60),
  "blue": (40, 70, 220),
  "yellow": (235, 195, 20),
}
_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 224
  num_train: int = 4000
  num_test: int = 400
  # Shape sides as fractions of the picture's (uniform): small objects, as
  # benchmarks/views.py draws them, need a high-resolution look.
  object_scale: tuple[float, float] = (0.2, 0.4)


def _where(box) -> str:
  """Coarse position of a box centre in thirds, in words."""
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  row = ("top", "", "bottom")[min(int(cy * 3), 2)]
  col = ("left", "", "right")[min(int(cx * 3), 2)]
  if not row and not col:
    return "in the middle"
  return "at the " + " ".join(w for w in (row, col) if w)


def sample_scene(
  rng: np.random.Generator, image_size: int, object_scale: tuple[float, float] = (0.2, 0.4)
) -> list[dict]:
  """1-3 objects: shape, colour, pixel box (side a uniform `object_scale`
  fraction of the picture's); boxes apart by a margin."""
  pairs = [(c, s) for c in COLOURS for s in SHAPES]
  chosen = rng.choice(len(pairs), size=rng.integers(1, 4), replace=False)
  objects, margin = [], max(2, image_size // 32)
  for index in chosen:
    for _ in range(50):  # rejection sampling; 3 objects of <= 40% side always fit
      side = max(2, int(rng.uniform(*object_scale) * image_size))
      x0, y0 = rng.integers(0, image_size - side, size=2)
      box = (int(x0), int(y0), int(x0) + side, int(y0) + side)
      if all(
        box[0] >= o["box"][2] + margin
        or o["box"][0] >= box[2] + margin
        or box[1] >= o["box"][3] + margin
        or o["box"][1] >= box[3] + margin
        for o in objects
      ):
        colour, shape = pairs[index]
        objects.append(dict(colour=colour, shape=shape, box=box))
        break
  return sorted(objects, key=lambda o: (o["box"][0], o["box"][1]))


def draw(rng: np.random.Generator, objects: list[dict], image_size: int) -> np.ndarray:
  """The picture as uint8 [S, S, 3]."""
  s = image_size
  base = rng.integers(170, 240, size=3).astype(np.float32)
  ramp = np.linspace(-1, 1, s, dtype=np.float32)[:, None, None] * rng.uniform(-15, 15, size=3)
  image = base + (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))
  image = (image + rng.integers(-4, 5, size=(s, s, 3), dtype=np.int8)).astype(np.uint8)
  for o in objects:
    x0, y0, x1, y1 = o["box"]
    # Pixel centres inside the box, relative to its top-left corner.
    yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32) + 0.5
    w, h = x1 - x0, y1 - y0
    if o["shape"] == "circle":
      inside = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 <= (w / 2) ** 2
    elif o["shape"] == "square":
      inside = np.ones(xx.shape, bool)
    else:  # upward triangle filling its box
      inside = np.abs(xx - w / 2) <= yy / h * w / 2
    image[y0:y1, x0:x1][inside] = COLOURS[o["colour"]]
  return image


def describe(objects: list[dict], image_size: int) -> dict:
  """Caption, GrIT spans, per-object expressions and a layout description."""
  caption, chunks, exps, boxes = "an image of ", [], [], []
  for i, o in enumerate(objects):
    if i:
      caption += " and " if i == len(objects) - 1 else ", "
    box = [v / image_size for v in o["box"]]
    chunk = f"a {o['colour']} {o['shape']}"
    start = len(caption)
    caption += f"{chunk} {_where(box)}"
    chunks.append([start, start + len(chunk), *box, 1.0])
    exps.append([start, len(caption), *box, 1.0])
    boxes.append(box)
  names = [f"the {o['colour']} {o['shape']}" for o in objects]
  relations = [f"{a} is left of {b}." for a, b in zip(names, names[1:])]
  return dict(
    caption=caption + ".",
    noun_chunks=np.array(chunks, np.float32).reshape(-1, 7),
    ref_exps=np.array(exps, np.float32).reshape(-1, 7),
    objects=dict(expression=names, bbox=np.array(boxes, np.float32).reshape(-1, 4)),
    description=" ".join(relations) or f"{names[0]} is alone.",
  )


def make_example(
  split: str, index: int, image_size: int, object_scale: tuple[float, float] = (0.2, 0.4)
) -> dict:
  """Example `index` of `split`: a pure function of its arguments."""
  rng = np.random.default_rng([_SEEDS[split], index])
  objects = sample_scene(rng, image_size, tuple(object_scale))
  buffer = io.BytesIO()
  Image.fromarray(draw(rng, objects, image_size)).save(buffer, "JPEG", quality=90)
  return dict(
    key=f"{split}-{index:06d}",
    image=buffer.getvalue(),
    width=image_size,
    height=image_size,
    **describe(objects, image_size),
  )


class KosmosShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with grounded captions (see the module doc)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ShapesConfig(name=str(s), image_size=s) for s in (224, 64, 32)]

  # tfds 4.9.10's default reads `importlib_resources` (a backport it only
  # installs for Python < 3.9) for any builder defined inside a package.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    spans = tfds.features.Tensor(shape=(None, 7), dtype=np.float32)
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "key": tfds.features.Text(),
          "image": tfds.features.Image(shape=(s, s, 3), encoding_format="jpeg"),
          "width": np.int32,
          "height": np.int32,
          "caption": tfds.features.Text(),
          "noun_chunks": spans,
          "ref_exps": spans,
          "description": tfds.features.Text(),
          "objects": tfds.features.Sequence(
            {
              "expression": tfds.features.Text(),
              "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            }
          ),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    return {
      "train": self._generate_examples("train", config.num_train),
      "test": self._generate_examples("test", config.num_test),
    }

  def _generate_examples(self, split: str, count: int):
    for index in range(count):
      config = self.builder_config
      example = make_example(split, index, config.image_size, config.object_scale)
      example["image"] = io.BytesIO(example["image"])
      yield example["key"], example


_BUILT: dict[tuple, tfds.core.DatasetBuilder] = {}


def build(
  data_dir: str | None = None, config: str | ShapesConfig = "224"
) -> tfds.core.DatasetBuilder:
  """The prepared builder (generated on first use into `data_dir`).

  Kept per (directory, config) for the process: seqio asks for the source on
  every `get_dataset`, and preparing a builder costs a few hundred ms even
  when the files exist.
  """
  data_dir = data_dir or os.path.join(cache_dir(), "tfds")
  key = (data_dir, config if isinstance(config, str) else repr(config))
  if key not in _BUILT:
    with _exclusive(data_dir, config if isinstance(config, str) else config.name):
      builder = KosmosShapes(config=config, data_dir=data_dir)
      builder.download_and_prepare()
    _BUILT[key] = builder
  return _BUILT[key]


@contextlib.contextmanager
def _exclusive(data_dir: str, name: str):
  """Holds a lock file while one process prepares a config: two demo runs
  started together both generated it and raced on TFDS's final rename
  (FileExistsError). Local directories only; a bucket is prepared once, by hand."""
  if "://" in data_dir:
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".kosmos_shapes-{name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def cache_dir() -> str:
  """$KOSMOS_JAX_CACHE, else ~/.cache/kosmos_jax."""
  return os.environ.get(
    "KOSMOS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kosmos_jax")
  )


def spm_corpus() -> list[str]:
  """Sentences covering the dataset's words (and every printable ASCII
  character, so other text still encodes without <unk>)."""
  lines = []
  for index in range(300):
    rng = np.random.default_rng([_SEEDS["train"], index])
    text = describe(sample_scene(rng, 224), 224)
    lines += [text["caption"], text["description"]]
  return lines + [" ".join(chr(c) for c in range(33, 127))]


def shapes_vocabulary(
  num_patches_per_side: int = 32, directory: str | None = None
) -> vocab_lib.KosmosVocabulary:
  """KosmosVocabulary on the shapes sentencepiece model, trained on first use.

  Training is deterministic (fixed corpus, one thread), so every host trains
  the same model; the file is written atomically into `directory` (default
  `cache_dir()/shapes_spm_v1`).
  """
  directory = directory or os.path.join(cache_dir(), "shapes_spm_v1")
  path = os.path.join(directory, "sentencepiece.bpe.model")
  if not os.path.exists(path):
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
      spm.SentencePieceTrainer.train(
        sentence_iterator=iter(spm_corpus()),
        model_prefix=os.path.join(tmp, "m"),
        vocab_size=150,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
      )
      os.replace(os.path.join(tmp, "m.model"), path)
  return vocab_lib.KosmosVocabulary(path, num_patches_per_side)
