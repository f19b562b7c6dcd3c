"""Building models: from a config, from our checkpoints, from Hugging Face snapshots."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kosmos_jax.models.kosmos import Kosmos2


def abstract_model(config: ml_collections.ConfigDict) -> Kosmos2:
  """The model with ShapeDtypeStructs for parameters; allocates nothing."""
  return nnx.eval_shape(lambda: Kosmos2(config, rngs=nnx.Rngs(0)))


def abstract_params(config: ml_collections.ConfigDict) -> dict:
  return nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))


def param_count(config: ml_collections.ConfigDict) -> int:
  return sum(x.size for x in jax.tree.leaves(abstract_params(config)))


def model_from_params(config: ml_collections.ConfigDict, params: dict) -> Kosmos2:
  """A model holding `params` (nested dict of arrays), cast to config.param_dtype."""
  graphdef, state = nnx.split(abstract_model(config))
  dtype = jnp.dtype(config.param_dtype)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
  return nnx.merge(graphdef, state)


def read_generation_config(path: str) -> ml_collections.FrozenConfigDict:
  """`generation_config.json` of a checkpoint directory (empty if it has none).

  Frozen (hashable), so the model it is stored on stays usable as a static
  jit argument. Bookkeeping keys (`_from_model_config`, versions) are dropped.
  """
  file = os.path.join(path, "generation_config.json")
  if not os.path.exists(file):
    return ml_collections.FrozenConfigDict({})
  with open(file, encoding="utf-8") as f:
    values = json.load(f)
  return ml_collections.FrozenConfigDict(
      {k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"})


def from_pretrained(path: str, *, allow_pickle: bool = False, progress: bool = False,
                    **config_overrides) -> Kosmos2:
  """Loads a Hugging Face Kosmos-2 snapshot directory or a kosmos-jax checkpoint.

  Args:
    path: a directory with `config.json` + `model.safetensors` (or a sharded
      index) from Hugging Face, or one written by `kosmos-jax convert` or the
      trainer (`kosmos_config.json` + Orbax `params/`).
    allow_pickle: accept `pytorch_model.bin` (weights-only unpickling).
    progress: show a progress bar while reading tensors.
    **config_overrides: model config keys to change, e.g. dtype="bfloat16",
      attention="pallas"; shapes cannot change.

  The directory's `generation_config.json`, if any, becomes
  `model.generation_config`: the defaults of `model.generate`.
  """
  # Imported here: the converter pulls in safetensors/tqdm only when needed.
  from kosmos_jax.convert import hf  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  if checkpoint.is_checkpoint(path):
    config = checkpoint.load_config(path)
    config.update(config_overrides)
    params = checkpoint.load_params(path, abstract_params(config))
    model = model_from_params(config, params)
  else:
    hf_config, tensors = hf.read_hf_dir(path, allow_pickle=allow_pickle, progress=progress)
    config = hf.config_from_hf(hf_config)
    config.update(config_overrides)
    params = hf.hf_to_params(tensors, config, expected_shapes=abstract_params(config),
                             progress=progress)
    model = model_from_params(config, params)
  model.generation_config = read_generation_config(path)
  return model
