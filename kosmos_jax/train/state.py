"""The train state, built one way for the trainer, `kosmos-jax aot` and the benchmarks.

`kosmos-jax aot` compiles exactly the program the trainer runs only if both
build the same state: same pytree, same dtypes, same kind of RNG key.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from kosmos_jax.models import build, lora
from kosmos_jax.train import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the model's Params
  opt_state: Any
  rng: jax.Array  # a raw uint32[2] key: Orbax saves and restores it as a plain array
  skipped: jax.Array  # non-finite steps so far
  bad_in_a_row: jax.Array


def create(
  params: nnx.State, tx: optax.GradientTransformation, seed: int, trainable=None
) -> TrainState:
  """The state at step 0 around `params` (the model's nnx.Param state).

  `trainable` (regexes, `optim.trainable_patterns`): the optimizer state is
  built for those parameters only; None: for all.
  """
  # One array per counter: a state built eagerly and donated to a jitted step
  # must not hold one buffer three times (donating it twice crashes).
  counter = lambda: jnp.zeros((), jnp.int32)
  return TrainState(
    step=counter(),
    params=params,
    opt_state=tx.init(params if trainable is None else optim.split_trainable(params, trainable)[0]),
    rng=jax.random.PRNGKey(seed),
    skipped=counter(),
    bad_in_a_row=counter(),
  )


def abstract(
  model_config: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
  seed: int = 0,
  *,
  lora_config=None,
  trainable=None,
) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, the state as ShapeDtypeStructs) for a model config, with the
  adapters of `lora_config` (models/lora.py) if on; allocates nothing."""
  if lora.enabled(lora_config):
    model = lora.abstract_model(model_config, lora_config, seed)
  else:
    model = build.abstract_model(model_config)
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, jax.eval_shape(lambda p: create(p, tx, seed, trainable), params)
