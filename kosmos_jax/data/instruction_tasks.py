"""Language-only instruction tuning (KOSMOS-1, reference 3.4), mixed into pretraining.

KOSMOS-1 tuned on Unnatural Instructions (68,478 examples) and 54k FLANv2
examples, text only. Here: a task over the user's JSONL files (formats and the
prompt template in instructions.py) whose examples are `<s> prompt response
</s>`, the loss on the response and `</s>` only, and a mixture of a
pretraining mixture's tasks (at their rates) plus that task at a configured
rate. The feature converter shifts and packs each example's loss weights
with its own tokens, so a packed row learns the responses and nothing of the
prompts.

From a config (`loader.register_user_tasks`), the optional `data.instructions`:

  mixture           the pretraining mixture it joins ("": the instruction task alone,
                    tokenized with `data.spm_model_file`)
  rate              its rate in that mixture's units: its share of the examples is
                    rate / (rate + the sum of the mixture's rates)
  files             comma-separated globs of JSONL files ("": DATA_DIR/instructions/*.jsonl)
  validation_files  ("": DATA_DIR/instructions/validation/*.jsonl, if that matches any)
  name              the task's name ("instructions"); the mixture is `{mixture}_{name}`
  image_size        of the (empty) picture batch: 0 = that of the mixture's tasks, else 224
  strict            stop at the first bad record (its file and line) instead of counting it
"""

import functools
import os

import seqio
import tensorflow as tf

from kosmos_jax import errors
from kosmos_jax.data import preprocessors, quality, sources, tasks, tf_text
from kosmos_jax.processing import vocab as vocab_lib

CONFIG_DEFAULTS = dict(
  mixture="",
  rate=0.0,
  files="",
  validation_files="",
  name="instructions",
  image_size=0,
  strict=False,
)


def instruction_examples(
  dataset: tf.data.Dataset,
  vocab: vocab_lib.KosmosVocabulary,
  image_size: int = 224,
  stats: quality.DataStats | None = None,
) -> tf.data.Dataset:
  """`sources.read_instructions` records -> `<s> prompt response </s>`, loss
  weights 0 on `<s>` and the prompt, 1 on the response and `</s>`, and an
  empty `images` (so that the task mixes with image tasks). A record with a
  problem is counted by it and marked for dropping."""
  dataset = (stats or quality.default_stats()).count_input(dataset)
  names = tf.constant(quality.REASON_NAMES)

  @tf.autograph.experimental.do_not_convert
  def example(x):
    texts, issues = tf_text.repair_utf8(tf.stack([x["prompt"], x["response"]]))
    # Tokenized apart: at generation time the prompt is encoded alone too.
    ids = vocab.encode_plain_tf(texts)
    out = tf_text.join(
      tf_text.token_part(vocab.bos_id, weight=0),
      tf_text.text_part(ids[0], weight=0),
      tf_text.text_part(ids[1]),
      tf_text.token_part(vocab.eos_id),
    )
    out.update(key=x["key"], images=tf.zeros([0, 3, image_size, image_size]))
    problem = tf.cast(tf.equal(names, x["problem"]), tf.int32)
    return quality.with_issues(
      out, tf.reduce_sum(issues, 0) + problem, tf.not_equal(x["problem"], "")
    )

  return dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def register_instruction_task(
  name: str,
  patterns: dict[str, str],
  vocab: vocab_lib.KosmosVocabulary,
  image_size: int = 224,
  strict: bool = False,
) -> None:
  """The task `name` over the JSONL files `patterns` (split -> comma-separated globs)."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
    name,
    source=sources.function_source(patterns, "instructions"),
    preprocessors=[
      functools.partial(instruction_examples, vocab=vocab, image_size=image_size),
      preprocessors.trim,
      functools.partial(preprocessors.drop_without_loss, reason="instruction_response_cut"),
      functools.partial(quality.filter_and_count, strict=strict),
    ],
    output_features=tasks.output_features(vocab),
  )


def register_instruction_mixture(name: str, base: str, task: str, rate: float) -> None:
  """The mixture `name`: the tasks of mixture `base` at their rates plus `task` at `rate`."""
  mixture = seqio.MixtureRegistry.get(base)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  tasks.register_mixture(name, dict(rates, **{task: rate}))


def _image_size(provider) -> int:
  """The picture size the family preprocessors of a mixture's tasks were given."""
  for task in provider.tasks if isinstance(provider, seqio.Mixture) else [provider]:
    for p in task.preprocessors:
      size = getattr(p, "keywords", {}).get("image_size")
      if size:
        return size
  raise errors.UserError(f"set data.instructions.image_size: no task of {provider.name} names it")


def _patterns(entry: dict, data_dir: str) -> dict[str, str]:
  folder = os.path.join(data_dir, "instructions") if data_dir else ""
  train = entry["files"] or (os.path.join(folder, "*.jsonl") if folder else "")
  if not train:
    raise errors.UserError("data.instructions needs files (or data.data_dir with instructions/)")
  patterns = {"train": train}
  validation = entry["validation_files"]
  default = os.path.join(folder, "validation", "*.jsonl") if folder else ""
  if not validation and default and tf.io.gfile.glob(default):
    validation = default
  if validation:
    patterns["validation"] = validation
  return patterns


def register_from_config(entry, data_dir: str = "", spm_model_file: str = "") -> str:
  """Registers what `data.instructions` (keys: the module doc) describes;
  returns the name to train on: `{mixture}_{name}`, or `name` alone."""
  entry = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)  # a ConfigDict or dict
  unknown = set(entry) - set(CONFIG_DEFAULTS)
  if unknown:
    raise errors.UserError(
      f"data.instructions: unknown keys {sorted(unknown)} (known: {sorted(CONFIG_DEFAULTS)})"
    )
  entry = dict(CONFIG_DEFAULTS, **entry)
  name, base = entry["name"], entry["mixture"]
  if base:
    if base not in seqio.MixtureRegistry.names():
      raise errors.UserError(f"data.instructions.mixture: no mixture named {base!r}")
    if not entry["rate"] > 0:
      raise errors.UserError("data.instructions.rate must be > 0 to join a mixture")
    provider = seqio.MixtureRegistry.get(base)
    vocab = provider.output_features["targets"].vocabulary
    image_size = entry["image_size"] or _image_size(provider)
  else:
    if not spm_model_file:
      raise errors.UserError("data.instructions without a mixture needs data.spm_model_file")
    vocab = vocab_lib.KosmosVocabulary(spm_model_file)
    image_size = entry["image_size"] or 224
  register_instruction_task(name, _patterns(entry, data_dir), vocab, image_size, entry["strict"])
  if not base:
    return name
  register_instruction_mixture(f"{base}_{name}", base, name, entry["rate"])
  return f"{base}_{name}"
