"""The keys every config file shares, around a model config.

Config files (`configs/*.py`, ml_collections) call `experiment_config(model)`
and override what they need; the command line overrides any key with
`--config.key=value`.
"""

import ast
import importlib
import importlib.util
import os
import sys

import ml_collections

from kosmos_jax import errors, sharding
from kosmos_jax.models import lora
from kosmos_jax.train import optim


class ConfigError(errors.UserError):
  """A config file that cannot be loaded, or an override that does not fit it."""


def experiment_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Model plus the training keys every config has (scripts set them by name)."""
  config = ml_collections.ConfigDict()
  config.model = model
  config.seed = 0
  # One value, two names: scripts set `--config.attention`, the model reads
  # `model.attention`. A FieldReference keeps them from drifting apart.
  config.attention = model.attention
  config.model.attention = config.get_ref("attention")
  # The step: global batch in sequences, packed length, images per packed row.
  config.batch_size = 8
  config.seq_len = 256
  config.images_per_row = 1
  config.accumulation = 1  # microbatches per step (gradient accumulation)
  config.z_loss = 0.0
  # Location-token targets as a Gaussian over the grid (sigma in cells)
  # rather than one cell, so a box one cell off is partly right; 0: one-hot,
  # as Kosmos-2 trained (train/step.py token_loss).
  config.location_sigma = 0.0
  config.total_steps = 1000
  config.log_every = 10
  config.checkpoint_every = 500
  config.eval_every = 0  # 0: no periodic evaluation
  # Run every `eval_every` steps besides the eval loss: name -> dict(task=
  # a kosmos_jax/eval/tasks.py name, split, num, batch_size, and the task's data
  # arguments), e.g. rec=dict(task="seqio_rec", seqio_task="shapes_rec",
  # split="validation", num=100) or refcoco=dict(task="refcoco",
  # annotations=".../finetune_refcoco_val.json", image_dir=".../train2014").
  config.evaluators = {}
  config.keep_checkpoints = 3
  config.max_bad_steps = 5  # non-finite steps in a row before the job stops
  config.init_from = ""  # a HF snapshot or kosmos-jax checkpoint to fine-tune
  # `kosmos2_*` mixtures read the user's files: set spm_model_file and data_dir.
  config.data = dict(
    mixture="shapes_mix",
    train_split="train",
    eval_split="validation",
    shuffle=True,
    eval_batches=4,
    spm_model_file="",
    data_dir="",
    autotune=True,  # tf.data's autotuning (data/loader.py: off for small CPU runs)
    # Modality vectors per packed row (model.modalities; models/batch.py); 0: none.
    modalities_per_row=0,
  )
  config.optim = optim.optim_config()
  # Low-rank adapters (models/lora.py), off at rank 0; on, only they and
  # `optim.train_also` train, e.g. --config.lora.rank=16.
  config.lora = lora.lora_config()
  config.mesh = sharding.mesh_config()
  config.sharding_rules = [list(rule) for rule in sharding.TRAIN_RULES]
  return config


def load(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a config file, then applies `key=value` overrides.

  Values are parsed to the type of the field they replace, so
  `mesh.data=4`, `attention=pallas` and `model.dtype=bfloat16` all work.
  """
  if not os.path.isfile(path) or not path.endswith(".py"):
    raise ConfigError(f"config file {path!r} not found (a configs/NAME.py file)")
  module = _import_file(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: a config file must define get_config()")
  config = module.get_config()
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ConfigError(f"config override {item!r} is not key=value")
    _set(config, key, raw)
  return config


def _import_file(path: str):
  """The module of a config file; a file in a package (configs/ has an
  `__init__.py`) is imported as `package.name`, so configs import their
  siblings (`from configs import kosmos2`) from any working directory."""
  directory, name = os.path.split(os.path.abspath(path))
  if not os.path.isfile(os.path.join(directory, "__init__.py")):
    spec = importlib.util.spec_from_file_location("kosmos_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  package = os.path.basename(directory)
  loaded = sys.modules.get(package)
  if loaded is None or list(getattr(loaded, "__path__", [])) != [directory]:
    # Not imported yet, or another package of that name: this directory's wins.
    for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
      del sys.modules[key]
    spec = importlib.util.spec_from_file_location(
      package, os.path.join(directory, "__init__.py"), submodule_search_locations=[directory]
    )
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[package] = loaded
    spec.loader.exec_module(loaded)
  return importlib.import_module(f"{package}.{name[:-3]}")


def _set(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets `key` (dotted) to `raw` parsed as the type of the value it replaces."""
  *parents, leaf = key.split(".")
  node = config
  for depth, name in enumerate([*parents, leaf]):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      where = ".".join(parents[:depth]) or "the config"
      known = ", ".join(sorted(node)) if isinstance(node, ml_collections.ConfigDict) else "none"
      raise ConfigError(f"config override {key!r}: {where} has no key {name!r} (keys: {known})")
    if depth < len(parents):
      node = node[name]
  current = node[leaf]
  if isinstance(current, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise ConfigError(f"config override {key!r}: {raw!r} is not a boolean (true or false)")
    value = raw.lower() in ("true", "1")
  elif isinstance(current, (int, float)):
    try:
      value = type(current)(raw)
    except ValueError:
      kind = type(current).__name__
      raise ConfigError(
        f"config override {key!r}: {raw!r} is not {'an' if kind == 'int' else 'a'} {kind} "
        f"(the config has {current!r})"
      ) from None
  elif isinstance(current, str):
    value = raw
  else:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
  node[leaf] = value
