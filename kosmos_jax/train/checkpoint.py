"""Our checkpoint format: Orbax parameters plus the model config that built them.

A checkpoint directory holds `kosmos_config.json` (the model ConfigDict) and
`params/` (an Orbax PyTree of the parameter state). `kosmos_jax.from_pretrained`
reads it; `kosmos-jax convert` writes it from a Hugging Face snapshot.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

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


def params_of(model: nnx.Module) -> dict:
  """The model's parameters as a nested dict of arrays."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
