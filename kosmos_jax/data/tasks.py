"""seqio tasks and mixtures.

Families: text, caption (image-text pairs without boxes), grit (grounded
image-text) and interleaved documents; for the shapes dataset also rec
(referring expressions). Each task: source -> family preprocessor (tf ops) ->
`preprocessors.trim` -> `quality.filter_and_count`; features as described in
preprocessors.py; feature lengths {"targets": L, "images": N}; convert with
`feature_converter.MultimodalFeatureConverter`.

Registered on import: `shapes_{text,caption,grit,interleaved,rec}` and the
mixture `shapes_mix` (224 px, 64 image tokens, 32 x 32 location bins, the
shapes sentencepiece model trained into the cache on first use). Real data:
call `register_kosmos2_tasks(spm_model_file, data_dir)` (the vocabulary file
must exist), which adds `kosmos2_{text,caption,grit,interleaved}` and the
mixtures `kosmos2_pretrain` and `kosmos2_kosmos1_pretrain` (no GrIT, KOSMOS-1's
rates). Other sizes (e.g. the tiny test model) register
their own twins with `register_shapes_tasks(prefix=..., image_size=...)`; so
does `make demo`, from its config (`data.shapes_tasks` in configs/shapes.py).
Language-only instruction tasks, and a pretraining mixture with one mixed in,
are registered by instruction_tasks.py (`data.instructions` in a config);
conversation tasks (images, boxes, modality vectors) by conversation_tasks.py
(`data.conversations`).
"""

import functools
import os

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from kosmos_jax.data import preprocessors, quality, shapes, sources
from kosmos_jax.processing import vocab as vocab_lib

# Paper Table 7's per-type batch sizes (sequences per step), reference 3.3.
KOSMOS2_RATES = {"text": 93, "caption": 1117, "grit": 1117, "interleaved": 47}
SHAPES_RATES = dict(KOSMOS2_RATES, rec=1117)
# KOSMOS-1's batch by tokens (reference 3.4): 0.5M text, 0.5M image-caption,
# 0.2M interleaved. seqio mixes examples, so the rates divide those shares by
# a mean example length: 2,048 tokens for text and interleaved documents (they
# fill a row), ~90 for a caption (64 slots + ~25 words and tags); scaled so
# captions get 1117 as in KOSMOS2_RATES. Data of other lengths needs its own.
KOSMOS1_RATES = {"text": 49, "caption": 1117, "interleaved": 20}


def output_features(
  vocab: vocab_lib.KosmosVocabulary, modalities: bool = False
) -> dict[str, seqio.Feature]:
  """Every feature the converter needs (mixtures keep only declared features);
  `modalities`: also the modality vectors of conversation_tasks.py."""
  ints = seqio.PassThroughVocabulary(size=0)
  features = {
    "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
    "loss_weights": seqio.Feature(ints, add_eos=False, dtype=tf.int32),
    "image_mask": seqio.Feature(ints, add_eos=False, dtype=tf.int32),
    "images": seqio.ContinuousFeature(dtype=tf.float32, rank=4, add_eos=False),
  }
  if modalities:
    features["modality_embeds"] = seqio.ContinuousFeature(dtype=tf.float32, rank=2, add_eos=False)
    features["modality_types"] = seqio.Feature(ints, add_eos=False, dtype=tf.int32)
  return features


def _register(name: str, source, preprocessors_, vocab, strict: bool):
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
    name,
    source=source,
    preprocessors=[
      *preprocessors_,
      preprocessors.trim,
      functools.partial(quality.filter_and_count, strict=strict),
    ],
    output_features=output_features(vocab),
  )


def register_mixture(name: str, rates: dict[str, int]):
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(rates.items()))


def _family_preprocessors(
  vocab,
  image_size,
  num_image_tokens,
  strict,
  transform,
  rec_per_image=False,
  rec_expression_loss=False,
  **grit,
):
  common = dict(vocab=vocab, image_size=image_size)
  images = dict(common, num_image_tokens=num_image_tokens, strict=strict)
  return {
    "text": [functools.partial(preprocessors.text_documents, **common)],
    "caption": [
      functools.partial(preprocessors.image_text, use_box_prob=0.0, transform=transform, **images)
    ],
    "grit": [functools.partial(preprocessors.image_text, transform=transform, **grit, **images)],
    "interleaved": [functools.partial(preprocessors.documents, transform=transform, **images)],
    "rec": [
      functools.partial(
        preprocessors.referring,
        per_image=rec_per_image,
        expression_loss=rec_expression_loss,
        **images,
      )
    ],
  }


def register_kosmos2_tasks(
  spm_model_file: str,
  data_dir: str,
  prefix: str = "kosmos2",
  image_size: int = 224,
  num_image_tokens: int = vocab_lib.NUM_IMAGE_TOKENS,
  num_patches_per_side: int = 32,
  use_box_prob: float = 0.5,
  phrase_mode: str = "expression",
  score_threshold: float = 0.65,
  strict: bool = False,
) -> None:
  """Tasks over the user's files under `data_dir` (layout in data/README.md):
  grit/, caption/ (*.tar, *.parquet or *.jsonl), interleaved/*.jsonl,
  text/*.jsonl|*.txt; split "train" = everything, "validation" = files under
  the `validation/` subfolder of each."""
  vocab = vocab_lib.KosmosVocabulary(spm_model_file, num_patches_per_side)
  family = _family_preprocessors(
    vocab,
    image_size,
    num_image_tokens,
    strict,
    "crop",
    use_box_prob=use_box_prob,
    phrase_mode=phrase_mode,
    score_threshold=score_threshold,
  )
  kinds = {
    "text": "text",
    "caption": "image_text",
    "grit": "image_text",
    "interleaved": "documents",
  }
  extensions = {
    "text": ("jsonl", "txt"),
    "image_text": ("tar", "parquet", "jsonl"),
    "documents": ("jsonl",),
  }
  for name, kind in kinds.items():
    folder = os.path.join(data_dir, name)
    patterns = {
      split: ",".join(os.path.join(folder, sub, f"*.{e}") for e in extensions[kind])
      for split, sub in (("train", ""), ("validation", "validation"))
    }
    _register(
      f"{prefix}_{name}", sources.function_source(patterns, kind), family[name], vocab, strict
    )
  register_mixture(f"{prefix}_pretrain", {f"{prefix}_{k}": v for k, v in KOSMOS2_RATES.items()})
  register_mixture(
    f"{prefix}_kosmos1_pretrain", {f"{prefix}_{k}": v for k, v in KOSMOS1_RATES.items()}
  )


def _shapes_dataset(split, shuffle_files, seed=None, *, data_dir, config, view):
  builder = shapes.build(data_dir, config)
  ds = builder.as_dataset(
    {"train": "train", "validation": "test"}[split],
    shuffle_files=shuffle_files,
    decoders={"image": tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(shuffle_seed=seed),
  )
  return view(ds)


def _mapped(fn):
  fn = tf.autograph.experimental.do_not_convert(fn)  # plain tf ops; converting costs start-up
  return lambda ds: ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _grit_view(x):
  return {k: x[k] for k in ("key", "image", "caption", "noun_chunks", "ref_exps")}


def _caption_view(x):
  return {k: x[k] for k in ("key", "image", "caption")}


def _rec_view(x):
  return dict(
    key=x["key"],
    image=x["image"],
    expressions=x["objects"]["expression"],
    boxes=x["objects"]["bbox"],
  )


def _text_view(x):
  return dict(key=x["key"], text=x["description"])


def _documents_view(ds, pictures: int = 3):
  """Consecutive pictures as one document: image, caption, image, caption, ..."""

  @tf.autograph.experimental.do_not_convert
  def document(x):
    texts = tf.stack([tf.zeros_like(x["caption"]), x["caption"]], 1)
    images = tf.stack([x["image"], tf.zeros_like(x["image"])], 1)
    return dict(key=x["key"][0], texts=tf.reshape(texts, [-1]), images=tf.reshape(images, [-1]))

  return ds.batch(pictures).map(document)


_SHAPES_VIEWS = {
  "text": _mapped(_text_view),
  "caption": _mapped(_caption_view),
  "grit": _mapped(_grit_view),
  "interleaved": _documents_view,
  "rec": _mapped(_rec_view),
}


def register_shapes_tasks(
  prefix: str = "shapes",
  image_size: int = 224,
  num_image_tokens: int = vocab_lib.NUM_IMAGE_TOKENS,
  num_patches_per_side: int = 32,
  data_dir: str | None = None,
  config: str | dict | shapes.ShapesConfig | None = None,
  strict: bool = False,
  rates: dict[str, float] | None = None,
  use_box_prob: float = 0.5,
  rec_per_image: bool = False,
  rec_expression_loss: bool = False,
) -> None:
  """`{prefix}_{text,caption,grit,interleaved,rec}` and `{prefix}_mix` on the
  shapes TFDS dataset (config named after `image_size` unless given); splits
  "train" and "validation" (the held-out "test" split). The inference
  ("square") transform keeps every box whole. `rates` (by family) default to
  `SHAPES_RATES`. A dict `config` holds the fields of a `ShapesConfig`.
  `use_box_prob`: the grit task's chance of grounding a caption;
  `rec_per_image`, `rec_expression_loss`: `preprocessors.referring`'s
  `per_image` and `expression_loss`."""
  if isinstance(config, dict):
    config = shapes.ShapesConfig(**config)
  vocab = shapes.shapes_vocabulary(num_patches_per_side)
  family = _family_preprocessors(
    vocab,
    image_size,
    num_image_tokens,
    strict,
    "square",
    rec_per_image=rec_per_image,
    rec_expression_loss=rec_expression_loss,
    use_box_prob=use_box_prob,
    phrase_mode="expression",
    score_threshold=0.65,
  )
  for name, view in _SHAPES_VIEWS.items():
    source = seqio.FunctionDataSource(
      functools.partial(
        _shapes_dataset, data_dir=data_dir, config=config or str(image_size), view=view
      ),
      splits=("train", "validation"),
    )
    _register(f"{prefix}_{name}", source, family[name], vocab, strict)
  register_mixture(
    f"{prefix}_mix", {f"{prefix}_{k}": v for k, v in (rates or SHAPES_RATES).items()}
  )


# The released shape (224 px, 64 slots), a small one and the test model's.
register_shapes_tasks()
register_shapes_tasks(prefix="shapes64", image_size=64, num_image_tokens=16)
register_shapes_tasks(prefix="shapes32", image_size=32, num_image_tokens=8)
