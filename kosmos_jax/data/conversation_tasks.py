"""Conversation tuning (LLaVA / SPHINX style, PandaGPT modality vectors) as a seqio task.

Examples are `<s>` + the template of processing/conversation.py, each part
tokenized on its own; the loss falls on the answers and the `</s>` after each,
nothing else (prompts, `<s>`, image and modality blocks). `<image>` expands to
`<image>` + the image slots + `</image>`, `<name>` to `<name>` + `modality_tokens`
slots + `</name>`; `image_mask` is 1 on image slots, 2 on modality slots.
Features: targets, loss_weights, image_mask, images [k, 3, S, S] (square
transform: boxes stay where they are), and for a model with modalities
modality_embeds float32 [m, D] (D = the widest modality, zero-padded) and
modality_types int32 [m] (the index in sorted(modalities)), in slot order.
The record format is in conversations.py.

From a config (`loader.register_user_tasks`), the optional `data.conversations`:

  files             comma-separated globs of JSONL files ("": DATA_DIR/conversations/*.jsonl)
  validation_files  ("": DATA_DIR/conversations/validation/*.jsonl, if that matches any)
  name              the task's name ("conversations")
  image_dir         folder of relative image paths ("": each JSONL file's folder);
                    LLaVA's files name images under their own image root
  mixture           a pretraining mixture it joins ("": the task alone); only
                    for models without modalities (the mixture's tasks carry none)
  rate              its rate in that mixture, as data.instructions' rate
  image_size        0: the model's (or the mixture's tasks', or 224)
  quantizer         of `<box>` ("hf" as grounded captions, or "original")
  strict            stop at the first bad record (its file and line) instead of counting it
  template          a task prompt's name (task_prompts.py: "vqa", "rec", ...): each
                    human value is put through it ("": the values as they are)
  prompts_file      a JSON file of more task prompts (name -> template)
The pictures' slots, location bins, modalities (`model.modalities`: name ->
width) and `model.modality_tokens` (default 4) come from the model config.
"""

import functools
import os

import seqio
import tensorflow as tf

from kosmos_jax import errors
from kosmos_jax.data import conversations as records
from kosmos_jax.data import (
  instruction_tasks,
  preprocessors,
  quality,
  sources,
  task_prompts,
  tasks,
  tf_image,
  tf_text,
)
from kosmos_jax.processing import views
from kosmos_jax.processing import vocab as vocab_lib

CONFIG_DEFAULTS = dict(
  files="",
  validation_files="",
  name="conversations",
  image_dir="",
  mixture="",
  rate=0.0,
  image_size=0,
  quantizer="hf",
  strict=False,
  template="",
  prompts_file="",
)
DEFAULT_MODALITY_TOKENS = 4


def _pictures(data: tf.Tensor, ok: tf.Tensor, size: int):
  """Encoded images [k] -> (uint8 [k, S, S, 3], each one's (h, w) float64 [k, 2]);
  nothing decoded unless `ok` (bad bytes would make the decoder raise)."""

  def one(d):
    def decode():
      image = tf_image.decode_rgb(d)
      hw = tf.cast(tf.shape(image)[:2], tf.float64)
      return tf.ensure_shape(tf_image.resize_square(image, size), [size, size, 3]), hw

    return tf.cond(
      ok, decode, lambda: (tf.zeros([size, size, 3], tf.uint8), tf.zeros([2], tf.float64))
    )

  signature = (tf.TensorSpec([size, size, 3], tf.uint8), tf.TensorSpec([2], tf.float64))
  return tf.map_fn(one, data, fn_output_signature=signature)


def _rows(block: tf.Tensor, on: tf.Tensor) -> tf.RaggedTensor:
  """Row i of `block` [n, w] where `on[i]`, else an empty row."""
  return tf.RaggedTensor.from_tensor(block, lengths=tf.where(on, tf.shape(block)[1], 0))


def conversation_examples(
  dataset: tf.data.Dataset,
  vocab: vocab_lib.KosmosVocabulary,
  image_size: int = 224,
  num_image_tokens: int = vocab_lib.NUM_IMAGE_TOKENS,
  modality_tokens: int = DEFAULT_MODALITY_TOKENS,
  modality_dim: int = 0,
  quantizer: str = "hf",
  strict: bool = False,
  stats: quality.DataStats | None = None,
) -> tf.data.Dataset:
  """`sources.read_conversations` records -> examples (module doc). A record
  with a problem, a bad image or a box outside its picture is counted by
  reason and marked for dropping. `vocab.modalities` are the model's."""
  dataset = (stats or quality.default_stats()).count_input(dataset)
  names = tf.constant(quality.REASON_NAMES)
  image_ids, _, image_mask = tf_text.image_part(vocab, num_image_tokens)
  # A dummy entry keeps the gathers below in range for models without modalities.
  tags = [vocab.modality_tag_ids(n) for n in vocab.modalities] or [(0, 0)]
  opening, closing = (tf.constant(t, tf.int32)[:, None] for t in zip(*tags))
  slots = tf.constant(vocab_lib.image_slot_ids(modality_tokens), tf.int32)

  @tf.autograph.experimental.do_not_convert
  def example(x):
    texts, utf8 = tf_text.repair_utf8(x["texts"])
    kinds, refs = x["kinds"], x["refs"]
    n = tf.size(kinds)
    is_kind = lambda k: tf.equal(kinds, k)
    checks = tf.map_fn(tf_image.check_image_bytes, x["images"], fn_output_signature=tf.int32)
    bad_image = tf.reduce_any(checks > 0)
    pixels, sizes = _pictures(x["images"], ~bad_image, image_size)
    # Pixel boxes are relative to the first picture; without one they come
    # out non-finite, hence outside.
    h, w = tf.unstack(tf.concat([sizes, tf.zeros([1, 2], tf.float64)], 0)[0])
    boxes = tf.cast(x["boxes"], tf.float64)
    boxes = tf.where(x["box_pixels"], boxes / tf.stack([w, h, w, h]), boxes)
    x0, y0, x1, y1 = tf.unstack(boxes, 4, axis=1)
    inside = (
      tf.reduce_all(tf.math.is_finite(boxes) & (boxes >= 0) & (boxes <= 1), 1)
      & (x0 < x1)
      & (y0 < y1)
    )
    safe = tf.where(inside[:, None], boxes, tf.constant([[0, 0, 1, 1]], tf.float64))
    objects = tf.concat(
      [preprocessors.object_ids(vocab, safe, quantizer), tf.zeros([1, 4], tf.int32)], 0
    )
    # Each segment's ids, masks and weights, as ragged rows [n, None].
    ref = lambda table: tf.gather(table, tf.clip_by_value(refs, 0, tf.shape(table)[0] - 1))
    tile = lambda row: tf.tile(row[None], [n, 1])
    modality_ids = tf.concat([ref(opening), tile(slots), ref(closing)], 1)
    modality_mask = tile(tf.constant([0] + [2] * modality_tokens + [0], tf.int32))
    plain = vocab.encode_plain_tf(tf.where(is_kind(records.TEXT), texts, ""))
    tagged = vocab.encode_tf(tf.where(is_kind(records.TAG), texts, ""))
    pieces = [
      (plain, tf.zeros_like(plain)),
      (tagged, tf.zeros_like(tagged)),
      (
        _rows(tile(image_ids), is_kind(records.IMAGE)),
        _rows(tile(image_mask), is_kind(records.IMAGE)),
      ),
      (
        _rows(modality_ids, is_kind(records.MODALITY)),
        _rows(modality_mask, is_kind(records.MODALITY)),
      ),
      (
        _rows(ref(objects), is_kind(records.BOX)),
        _rows(tf.zeros([n, 4], tf.int32), is_kind(records.BOX)),
      ),
    ]
    ids = tf.concat([tf.cast(i, tf.int32) for i, _ in pieces], 1)
    mask = tf.concat([tf.cast(m, tf.int32) for _, m in pieces], 1).flat_values
    # Blocks never carry loss, even inside an answer.
    blocks = is_kind(records.IMAGE) | is_kind(records.MODALITY)
    weights = tf.gather(tf.where(blocks, 0, x["weights"]), tf_text.rows_of(ids.row_splits))
    out = tf_text.join(tf_text.token_part(vocab.bos_id, weight=0), (ids.flat_values, weights, mask))
    out.update(key=x["key"], images=tf_image.normalize(pixels))
    if vocab.modalities:
      out["modality_embeds"] = tf.ensure_shape(x["modality_embeds"], [None, modality_dim])
      out["modality_types"] = x["modality_types"]
    outside = tf.reduce_sum(tf.cast(~inside, tf.int32))
    issues = (
      tf.reduce_sum(utf8, 0)
      + tf.reduce_sum(checks, 0)
      + quality.issue("conversation_box_outside", outside)
      + tf.cast(tf.equal(names, x["problem"]), tf.int32)
    )
    drop = tf.not_equal(x["problem"], "") | bad_image | (outside > 0)
    return quality.with_issues(out, issues, drop)

  dataset = dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  # A picture that passes the header checks but fails to decode: the record
  # vanishes (quality.DataStats' decode_errors), or stops a strict run.
  return dataset if strict else dataset.ignore_errors()


def register_conversation_task(
  name: str,
  patterns: dict[str, str],
  vocab: vocab_lib.KosmosVocabulary,
  image_size: int = 224,
  num_image_tokens: int = vocab_lib.NUM_IMAGE_TOKENS,
  modalities: dict[str, int] | None = None,
  modality_tokens: int = DEFAULT_MODALITY_TOKENS,
  image_dir: str = "",
  quantizer: str = "hf",
  strict: bool = False,
  template: str = "",
  prompts_file: str = "",
) -> None:
  """The task `name` over the JSONL files `patterns` (split -> comma-separated
  globs); `modalities`: name -> vector width, those of `vocab`; `template`:
  a task prompt's name (task_prompts.py), looked up in `prompts_file` too."""
  modalities = dict(modalities or {})
  if tuple(sorted(modalities)) != vocab.modalities:
    raise ValueError(f"modalities {sorted(modalities)} differ from the vocabulary's")
  if modalities and modality_tokens < 1:
    raise ValueError(f"modality_tokens must be at least 1, got {modality_tokens}")
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  reader_args = dict(modalities=modalities, image_dir=image_dir)
  if template:
    text = task_prompts.template(template, prompts_file)
    source = sources.function_source(patterns, "conversations", dict(reader_args, template=text))
  else:
    source = sources.function_source(patterns, "conversations", reader_args)
  seqio.TaskRegistry.add(
    name,
    source=source,
    preprocessors=[
      functools.partial(
        conversation_examples,
        vocab=vocab,
        image_size=image_size,
        num_image_tokens=num_image_tokens,
        modality_tokens=modality_tokens,
        modality_dim=max(modalities.values(), default=0),
        quantizer=quantizer,
        strict=strict,
      ),
      preprocessors.trim,
      functools.partial(preprocessors.drop_without_loss, reason="conversation_answer_cut"),
      functools.partial(quality.filter_and_count, strict=strict),
    ],
    output_features=tasks.output_features(vocab, modalities=bool(modalities)),
  )


def _patterns(entry: dict, data_dir: str) -> dict[str, str]:
  folder = os.path.join(data_dir, "conversations") if data_dir else ""
  train = entry["files"] or (os.path.join(folder, "*.jsonl") if folder else "")
  if not train:
    raise errors.UserError("data.conversations needs files (or data.data_dir with conversations/)")
  patterns = {"train": train}
  validation = entry["validation_files"]
  default = os.path.join(folder, "validation", "*.jsonl") if folder else ""
  if not validation and default and tf.io.gfile.glob(default):
    validation = default
  if validation:
    patterns["validation"] = validation
  return patterns


def _model_sizes(model_config) -> dict:
  """The sizes the model fixes (the released model's without a config)."""
  if model_config is None:
    return dict(
      image_size=224,
      num_image_tokens=vocab_lib.NUM_IMAGE_TOKENS,
      num_patches_per_side=32,
      modalities={},
      modality_tokens=DEFAULT_MODALITY_TOKENS,
    )
  modalities = model_config.get("modalities", None) or {}
  modalities = modalities.to_dict() if hasattr(modalities, "to_dict") else dict(modalities)
  return dict(
    image_size=views.input_size(model_config.vision),
    num_image_tokens=views.image_slots(model_config),
    num_patches_per_side=model_config.text.num_patches_per_side,
    modalities={k: int(v) for k, v in modalities.items()},
    modality_tokens=int(model_config.get("modality_tokens", DEFAULT_MODALITY_TOKENS)),
  )


def _mixture_setting(provider: seqio.Mixture, key: str):
  """A preprocessor argument of a mixture's tasks (e.g. their picture size)."""
  for task in provider.tasks:
    for p in task.preprocessors:
      value = getattr(p, "keywords", {}).get(key)
      if value:
        return value
  return None


def register_from_config(entry, data_dir: str = "", spm_model_file: str = "", model_config=None):
  """Registers what `data.conversations` (keys: the module doc) describes;
  returns the name to train on: `{mixture}_{name}`, or `name` alone."""
  entry = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)  # a ConfigDict or dict
  unknown = set(entry) - set(CONFIG_DEFAULTS)
  if unknown:
    raise errors.UserError(
      f"data.conversations: unknown keys {sorted(unknown)} (known: {sorted(CONFIG_DEFAULTS)})"
    )
  entry = dict(CONFIG_DEFAULTS, **entry)
  name, base = entry["name"], entry["mixture"]
  sizes = _model_sizes(model_config)
  modalities = sizes["modalities"]
  if base:
    if base not in seqio.MixtureRegistry.names():
      raise errors.UserError(f"data.conversations.mixture: no mixture named {base!r}")
    if not entry["rate"] > 0:
      raise errors.UserError("data.conversations.rate must be > 0 to join a mixture")
    if modalities:
      raise errors.UserError(
        "data.conversations.mixture: a model with modalities trains on the conversation task "
        "alone (the mixture's tasks carry no modality vectors)"
      )
    provider = seqio.MixtureRegistry.get(base)
    vocab = provider.output_features["targets"].vocabulary
    if model_config is None:  # the sizes the mixture's image tasks were given
      sizes["image_size"] = _mixture_setting(provider, "image_size") or sizes["image_size"]
      sizes["num_image_tokens"] = (
        _mixture_setting(provider, "num_image_tokens") or sizes["num_image_tokens"]
      )
    image_size = entry["image_size"] or sizes["image_size"]
  else:
    if not spm_model_file:
      raise errors.UserError("data.conversations without a mixture needs data.spm_model_file")
    vocab = vocab_lib.KosmosVocabulary(
      spm_model_file, sizes["num_patches_per_side"], modalities=tuple(sorted(modalities))
    )
    image_size = entry["image_size"] or sizes["image_size"]
  register_conversation_task(
    name,
    _patterns(entry, data_dir),
    vocab,
    image_size=image_size,
    num_image_tokens=sizes["num_image_tokens"],
    modalities=modalities,
    modality_tokens=sizes["modality_tokens"],
    image_dir=entry["image_dir"],
    quantizer=entry["quantizer"],
    strict=entry["strict"],
    template=entry["template"],
    prompts_file=entry["prompts_file"],
  )
  if not base:
    return name
  instruction_tasks.register_instruction_mixture(f"{base}_{name}", base, name, entry["rate"])
  return f"{base}_{name}"


# ------------------------------------------------------- task-prompted mixtures
# `data.conversation_mixture` (SPHINX's task mix): several conversation tasks,
# each with its own files and task prompt, mixed by rate:
#
#   name                the mixture ("conversation_mixture"); task `key` is `{name}_{key}`
#   one_task_per_batch  True (SPHINX): each training batch holds one task, drawn by
#                       rate (loader.py); False: seqio mixes examples by rate
#   prompts_file        a JSON file of more task prompts (name -> template)
#   tasks               key -> dict(files, validation_files, image_dir, template,
#                       rate, quantizer, strict), as data.conversations' keys
MIXTURE_DEFAULTS = dict(
  name="conversation_mixture", one_task_per_batch=True, prompts_file="", tasks={}
)
MIXTURE_TASK_DEFAULTS = dict(
  files="", validation_files="", image_dir="", template="", rate=1.0, quantizer="hf", strict=False
)


def _known(entry: dict, defaults: dict, where: str) -> dict:
  unknown = set(entry) - set(defaults)
  if unknown:
    raise errors.UserError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(defaults)})")
  return dict(defaults, **entry)


def register_mixture_from_config(entry, spm_model_file: str, model_config=None) -> tuple[str, bool]:
  """Registers `data.conversation_mixture`'s tasks and their mixture; returns
  (the mixture's name, one_task_per_batch)."""
  as_dict = lambda x: x.to_dict() if hasattr(x, "to_dict") else dict(x)
  where = "data.conversation_mixture"
  entry = _known(as_dict(entry), MIXTURE_DEFAULTS, where)
  if not entry["tasks"]:
    raise errors.UserError(f"{where}.tasks: no tasks")
  if not spm_model_file:
    raise errors.UserError(f"{where} needs data.spm_model_file")
  sizes = _model_sizes(model_config)
  vocab = vocab_lib.KosmosVocabulary(
    spm_model_file, sizes["num_patches_per_side"], modalities=tuple(sorted(sizes["modalities"]))
  )
  rates = {}
  for key, task in as_dict(entry["tasks"]).items():
    task = _known(as_dict(task), MIXTURE_TASK_DEFAULTS, f"{where}.tasks.{key}")
    if not task["files"]:
      raise errors.UserError(f"{where}.tasks.{key}: no files")
    if not task["rate"] > 0:
      raise errors.UserError(f"{where}.tasks.{key}.rate must be > 0")
    patterns = {"train": task["files"]}
    if task["validation_files"]:
      patterns["validation"] = task["validation_files"]
    name = f"{entry['name']}_{key}"
    register_conversation_task(
      name,
      patterns,
      vocab,
      image_size=sizes["image_size"],
      num_image_tokens=sizes["num_image_tokens"],
      modalities=sizes["modalities"],
      modality_tokens=sizes["modality_tokens"],
      image_dir=task["image_dir"],
      quantizer=task["quantizer"],
      strict=task["strict"],
      template=task["template"],
      prompts_file=entry["prompts_file"],
    )
    rates[name] = float(task["rate"])
  tasks.register_mixture(entry["name"], rates)
  return entry["name"], bool(entry["one_task_per_batch"])
