"""Our two Orbax formats: converted checkpoints and trainer workdirs.

A converted checkpoint directory holds `kosmos_config.json` (the model
ConfigDict) and `params/` (an Orbax PyTree of the parameters);
`kosmos-jax convert` writes it from a Hugging Face snapshot.

A trainer workdir holds `config.json` (the experiment ConfigDict) and
`checkpoints/<step>/` (a CheckpointManager's steps, each with the train
state and every host's data iterator). `kosmos_jax.from_pretrained` reads
both (checkpoints/loading.py).
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "kosmos_config.json"
PARAMS_DIR = "params"


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_params(path: str, model_config: ml_collections.ConfigDict, params: dict) -> None:
  """Writes `params` (a nested dict of arrays) and the model config under `path`."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, PARAMS_DIR), params, force=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    f.write(model_config.to_json(indent=2))


def load_config(path: str) -> ml_collections.ConfigDict:
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: not found; {path!r} is not a kosmos-jax checkpoint")
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_params(path: str, abstract_params: dict) -> dict:
  """Restores parameters shaped like `abstract_params` (ShapeDtypeStructs).

  A shape that differs from the model's is an error naming the parameter.
  """
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(os.path.join(path, PARAMS_DIR)).item_metadata
    mismatches = []
    flat_want = dict(jax.tree_util.tree_flatten_with_path(abstract_params)[0])
    for key, meta in jax.tree_util.tree_flatten_with_path(stored)[0]:
      want = flat_want.get(key)
      name = jax.tree_util.keystr(key, simple=True, separator="/")
      if want is None:
        mismatches.append(f"{name}: in the checkpoint, not in the model")
      elif tuple(want.shape) != tuple(meta.shape):
        mismatches.append(f"{name}: checkpoint {tuple(meta.shape)} vs model {tuple(want.shape)}")
    if mismatches:
      raise ValueError(f"{path}: checkpoint does not fit the model:\n  " + "\n  ".join(mismatches))
    return checkpointer.restore(os.path.join(path, PARAMS_DIR), abstract_params)


# ------------------------------------------------------------ trainer workdirs

WORKDIR_CONFIG_FILE = "config.json"
WORKDIR_CHECKPOINTS = "checkpoints"


def as_path(workdir) -> epath.Path:
  """Local directories and gs:// buckets alike (every pod worker must see the same one)."""
  path = epath.Path(workdir)
  return path if "://" in os.fspath(workdir) else epath.Path(os.path.abspath(workdir))


def checkpoint_manager(
  workdir, *, keep: int | None = None, every: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints`: asynchronous saves every `every`
  steps, the last `keep` kept; `read_only` for restoring (it creates nothing).
  Orbax's own read_only mode is not used: it warns on every open."""
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=every or 1, enable_async_checkpointing=True, create=True
    )
  return ocp.CheckpointManager(as_path(workdir) / WORKDIR_CHECKPOINTS, options=options)


def is_workdir(path) -> bool:
  path = as_path(path)
  return (path / WORKDIR_CONFIG_FILE).exists() and (path / WORKDIR_CHECKPOINTS).is_dir()


def load_workdir_config(path) -> ml_collections.ConfigDict:
  """The experiment config a training run saved in its workdir."""
  file = as_path(path) / WORKDIR_CONFIG_FILE
  if not file.exists():
    raise FileNotFoundError(
      f"{file}: not found; {os.fspath(path)!r} is not a kosmos-jax trainer workdir"
    )
  return ml_collections.ConfigDict(json.loads(file.read_text()))


def load_workdir_params(path, abstract_params, step: int | None = None) -> dict:
  """The parameters of a trainer checkpoint (default: the latest step), on the
  default device. Only the parameters are read: the optimizer state
  and data iterator stay on disk."""
  with checkpoint_manager(path, read_only=True) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"{as_path(path) / WORKDIR_CHECKPOINTS}: no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(
        f"{os.fspath(path)}: no checkpoint of step {step} (steps: {', '.join(map(str, steps))})"
      )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # The trainer saves nnx Variables: each parameter is stored as {"value": array}.
    target = {
      "params": jax.tree.map(
        lambda x: {"value": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)},
        abstract_params,
      )
    }
    restore = ocp.args.PyTreeRestore(
      item=target,
      partial_restore=True,
      restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target),
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))
  is_variable = lambda x: isinstance(x, dict) and set(x) == {"value"}
  return jax.tree.map(lambda v: v["value"], restored.state["params"], is_leaf=is_variable)
