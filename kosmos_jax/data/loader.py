"""Batches for the trainer: a seqio mixture, packed, one shard per host, checkpointable.

The trainer sees numpy dicts in the feature converter's layout; the tf.data
iterator behind them is saved in every checkpoint (DataIteratorHandler), so a
resumed job reads exactly the batches it would have read.
"""

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf

# Importing tasks registers the built-in tasks and mixtures.
from kosmos_jax.data import (
  conversation_tasks,
  feature_converter,
  instruction_tasks,
  quality,
  shapes_instruct,
  tasks,
)
from kosmos_jax.processing import views

# Mixtures whose training batches each hold one task (SPHINX's grouped
# sampler; `data.conversation_mixture.one_task_per_batch`), by name.
ONE_TASK_PER_BATCH: set[str] = set()


def register_user_tasks(data_config, model_config=None) -> None:
  """Registers the tasks a config describes: the `kosmos2_*` tasks on the
  user's files (`data.spm_model_file`, `data.data_dir`; pictures, slots and
  location bins sized for `model_config` when given, else the released
  model's) and shapes tasks of
  its own sizes (`data.shapes_tasks`: `tasks.register_shapes_tasks`' arguments),
  then an instruction task mixed into one of them (`data.instructions`: see
  instruction_tasks.py; set `data.mixture` to the name it registers) and a
  conversation task, alone or mixed in (`data.conversations`: see
  conversation_tasks.py; its modalities are `model_config`'s), and a mixture
  of task-prompted conversation tasks (`data.conversation_mixture`, the
  shapes world's written first when `data.shapes_instruct` is set:
  shapes_instruct.prepare's arguments)."""
  shapes_tasks = data_config.get("shapes_tasks")
  if shapes_tasks:
    tasks.register_shapes_tasks(**shapes_tasks.to_dict())
  if data_config.spm_model_file and "kosmos2_pretrain" not in seqio.MixtureRegistry.names():
    sizes = {}
    if model_config is not None:  # e.g. a 448 px run of the 224 release
      sizes = dict(
        image_size=views.input_size(model_config.vision),
        num_image_tokens=views.image_slots(model_config),
        num_patches_per_side=model_config.text.num_patches_per_side,
      )
    tasks.register_kosmos2_tasks(data_config.spm_model_file, data_config.data_dir, **sizes)
  instructions = data_config.get("instructions")
  if instructions:
    instruction_tasks.register_from_config(
      instructions, data_config.get("data_dir", ""), data_config.get("spm_model_file", "")
    )
  conversations = data_config.get("conversations")
  if conversations:
    conversation_tasks.register_from_config(
      conversations,
      data_config.get("data_dir", ""),
      data_config.get("spm_model_file", ""),
      model_config,
    )
  instruct = data_config.get("shapes_instruct")
  if instruct:
    shapes_instruct.prepare(**instruct.to_dict())
  mixture = data_config.get("conversation_mixture")
  if mixture:
    name, one_task = conversation_tasks.register_mixture_from_config(
      mixture, data_config.get("spm_model_file", ""), model_config
    )
    (ONE_TASK_PER_BATCH.add if one_task else ONE_TASK_PER_BATCH.discard)(name)


def dataset(
  mixture: str,
  split: str,
  *,
  seq_len: int,
  images_per_row: int,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  repeat: bool = True,
  shard_index: int = 0,
  num_shards: int = 1,
  autotune: bool = True,
  modalities_per_row: int = 0,
  one_task_per_batch: bool | None = None,
) -> tf.data.Dataset:
  """Packed, batched rows of `mixture` for one host (`batch_size` rows per host).

  `modalities_per_row` > 0: rows carry that many modality vectors
  (`modality_embeds`, `modality_types`), for a model with modalities.

  `one_task_per_batch` (None: whether `mixture` is in ONE_TASK_PER_BATCH):
  with `repeat`, every batch comes whole from one task of the mixture
  (`one_task_batches`); a single pass reads the mixture as usual.

  `autotune=False` turns off tf.data's autotuning thread. On a 2-core
  machine the pipeline keeps up without it (2.4 ms a batch of the demo's
  either way), and with it, dropping the iterator at the end of a run
  sometimes waited 54-60 s for that thread (2 of 3 demo runs, the main
  thread in RootDataset::Iterator's destructor).
  """
  lengths = {"targets": seq_len, "images": images_per_row}
  if modalities_per_row:
    lengths["modalities"] = modalities_per_row
  rows = lambda name: seqio.get_dataset(
    name,
    lengths,
    feature_converter.MultimodalFeatureConverter(pack=True),
    dataset_split=split,
    shuffle=shuffle,
    num_epochs=None if repeat else 1,
    seed=seed,
    shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
  )
  if one_task_per_batch is None:
    one_task_per_batch = mixture in ONE_TASK_PER_BATCH
  options = tf.data.Options()
  # The bad-record counters (quality.DataStats) are tf.Variables updated in the
  # pipeline; the iterator's checkpoint leaves them out rather than refusing.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  options.autotune.enabled = autotune
  if repeat and one_task_per_batch:
    ds = one_task_batches(mixture, lambda t: rows(t).batch(batch_size, drop_remainder=True), seed)
  elif repeat:
    ds = rows(mixture).batch(batch_size, drop_remainder=True)
  else:
    # A single pass (evaluation) pads its last batch with empty rows (loss
    # weights 0) instead of dropping it: a small held-out set still counts.
    ds = rows(mixture).batch(batch_size)
    ds = ds.map(lambda b: {k: _pad_rows(v, batch_size) for k, v in b.items()})
  return ds.prefetch(2).with_options(options)


# ------------------------------------------------------ one task per batch
# SPHINX trains on a task mix with every global batch drawn from one task, so
# a step's gradient never averages conflicting instructions. Here the task of
# batch i is a stateless draw from (seed, i) by the mixture's rates: every
# host draws the same task for a step (each then reads its own shard of that
# task), and the draw's only state is the counter's position, which the
# iterator checkpoint saves with each task's reading position.


def task_choices(rates, seed: int) -> tf.data.Dataset:
  """Endless int64 task indices, index j with probability rates[j] / sum."""
  logits = tf.math.log(tf.constant([rates], tf.float64))
  seed = tf.constant(seed, tf.int64)
  draw = lambda i: tf.random.stateless_categorical(logits, 1, tf.stack([seed, i]))[0, 0]
  return tf.data.Dataset.counter().map(draw)


def one_task_batches(mixture: str, batches, seed: int) -> tf.data.Dataset:
  """Batches of one task each: task j's next batch (`batches(task_name)`,
  endless) where `task_choices` draws j."""
  provider = seqio.get_mixture_or_task(mixture)
  members = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  rates = [provider.get_rate(t) if isinstance(provider, seqio.Mixture) else 1.0 for t in members]
  members = [t for t, r in zip(members, rates) if r > 0]
  rates = [r for r in rates if r > 0]
  streams = [batches(t.name) for t in members]
  return tf.data.Dataset.choose_from_datasets(streams, task_choices(rates, seed))


def _pad_rows(x: tf.Tensor, rows: int) -> tf.Tensor:
  pad = [[0, rows - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
  return tf.ensure_shape(tf.pad(x, pad), [rows, *x.shape[1:]])


def numpy_batches(iterator) -> Iterator[dict[str, Any]]:
  for element in iterator:
    yield {k: v.numpy() for k, v in element.items()}


def dropped_records() -> dict[str, int]:
  """Records repaired or dropped so far in this process, by reason."""
  return quality.default_stats().as_dict()


# ----------------------------------------------------------------- checkpointing
# Every process writes its own iterator state (`process_<i>`) into the step's
# checkpoint directory, which Orbax finalises atomically with the rest.


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores a tf.data iterator with tf.train.Checkpoint."""

  def save(self, directory, args: "DataIteratorSave"):
    path = os.path.join(os.fspath(directory), f"process_{jax.process_index()}")
    tf.train.Checkpoint(iterator=args.iterator).write(path)

  def restore(self, directory, args: "DataIteratorRestore"):
    path = os.path.join(os.fspath(directory), f"process_{jax.process_index()}")
    tf.train.Checkpoint(iterator=args.iterator).read(path).assert_consumed()
    return args.iterator

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


# ----------------------------------------------------------------- raw records


def source_records(
  task_name: str, split: str, limit: int | None = None
) -> Iterator[dict[str, Any]]:
  """The first `limit` records of a task's source, before any preprocessing,
  as numpy values (bytes for strings and encoded images), in order."""
  ds = seqio.get_mixture_or_task(task_name).source.get_dataset(split=split, shuffle=False)
  if limit is not None:
    ds = ds.take(limit)
  return ds.as_numpy_iterator()


def vocabulary(task_name: str) -> seqio.Vocabulary:
  """The vocabulary of a task's (or mixture's) `targets`."""
  return seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
