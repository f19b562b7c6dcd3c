"""Models from a config: abstract (shapes only), or holding given parameters."""

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


def params_of(model: nnx.Module) -> dict:
  """The model's parameters as a nested dict of arrays."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(config: ml_collections.ConfigDict, params: dict) -> Kosmos2:
  """A model holding `params` (nested dict of arrays), cast to config.param_dtype."""
  graphdef, state = nnx.split(abstract_model(config))
  dtype = jnp.dtype(config.param_dtype)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
  return nnx.merge(graphdef, state)
