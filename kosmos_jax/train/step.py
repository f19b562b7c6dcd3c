"""The train step: masked next-token loss, gradient accumulation, AdamW, skip on non-finite.

A batch is a dict of arrays in the layout of `models/batch.py` (what the
feature converter writes); the model reads its `MODEL_INPUTS`, the loss its
`targets` and `loss_weights`. The state is `train/state.py`'s.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kosmos_jax.models import config as model_config
from kosmos_jax.models import lora
from kosmos_jax.models.batch import MODEL_INPUTS
from kosmos_jax.train import optim
from kosmos_jax.train.state import TrainState


@jax.custom_vjp
def _logsumexp_and_target(logits: jax.Array, targets: jax.Array):
  """Per token: float32 logsumexp, the target's logit, and whether the target
  is the prediction (its logit the maximum, no lower id tying it: argmax's
  first-index rule).

  The target's logit is picked with a one-hot select rather than a gather, so
  its gradient is elementwise, not a scatter into a zeroed copy of the logits
  (and a gather along a vocab axis split over devices would need the whole
  row). The maximum serves both the logsumexp and the accuracy: one pass.
  The backward pass recomputes the softmax from the saved logits (in their own
  dtype) and logsumexp: autodiff kept three [batch, length, vocab] float32 or
  bool intermediates besides the logits, 8.9 GiB at the released size (batch
  8 x 2048, vocabulary 65,037; the float32 logits themselves are 4 GiB).
  """
  return _logsumexp_and_target_fwd(logits, targets)[0]


def _logsumexp_and_target_fwd(logits, targets):
  x = logits.astype(jnp.float32)
  row_max = x.max(axis=-1)
  lse = jnp.log(jnp.exp(x - row_max[..., None]).sum(axis=-1)) + row_max
  ids = jnp.arange(x.shape[-1], dtype=targets.dtype)
  target_logit = jnp.where(ids == targets[..., None], x, 0.0).sum(axis=-1)
  ties_below = ((ids < targets[..., None]) & (x == row_max[..., None])).any(axis=-1)
  correct = (target_logit == row_max) & ~ties_below
  return (lse, target_logit, correct), (logits, targets, lse)


def _logsumexp_and_target_bwd(residuals, cotangents):
  logits, targets, lse = residuals
  d_lse, d_target, _ = cotangents  # `correct` is boolean: no gradient
  ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  softmax = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  d_logits = softmax * d_lse[..., None] + jnp.where(
    ids == targets[..., None], d_target[..., None], 0
  )
  return d_logits.astype(logits.dtype), None


_logsumexp_and_target.defvjp(_logsumexp_and_target_fwd, _logsumexp_and_target_bwd)


def _smoothed_location_logit(logits, targets, locations, target_logit):
  """`target_logit`, with the target's logit replaced by the expected logit
  under a Gaussian over the location grid around the target's cell where the
  target is a location token.

  `locations` is (first location id, cells per side P, sigma in cells). The
  Gaussian is separable, each axis normalised over the grid, so the soft
  target never builds a [tokens, P * P] weight table: two [tokens, P] ones
  contracted with the location logits seen as [tokens, P, P].
  """
  first, side, sigma = locations
  cell = targets - first
  is_location = (cell >= 0) & (cell < side * side)
  cell = jnp.clip(cell, 0, side * side - 1)
  grid = jnp.arange(side, dtype=jnp.float32)

  def axis_weights(centre):
    w = jnp.exp(-0.5 * jnp.square((grid - centre[..., None].astype(jnp.float32)) / sigma))
    return w / w.sum(axis=-1, keepdims=True)

  wy, wx = axis_weights(cell // side), axis_weights(cell % side)
  grid_logits = logits[..., first : first + side * side].astype(jnp.float32)
  grid_logits = grid_logits.reshape(*logits.shape[:-1], side, side)
  soft = jnp.einsum("...r,...rc,...c->...", wy, grid_logits, wx)
  return jnp.where(is_location, soft, target_logit)


def token_loss(logits: jax.Array, batch: dict, z_loss: float = 0.0, locations=None):
  """Sums of weighted cross-entropy, z-loss (z * logsumexp^2), correct
  predictions and weights; the caller divides by the weight of its batch.

  `locations` (first location id, cells per side, sigma in cells), if given,
  scores a location-token target against a Gaussian over its neighbouring
  cells rather than its one cell (`config.location_sigma`). Accuracy stays
  the exact cell's.
  """
  weights = batch["loss_weights"].astype(jnp.float32)
  lse, target_logit, correct = _logsumexp_and_target(logits, batch["targets"])
  if locations is not None:
    target_logit = _smoothed_location_logit(logits, batch["targets"], locations, target_logit)
  return dict(
    loss=((lse - target_logit) * weights).sum(),
    z_loss=(z_loss * jnp.square(lse) * weights).sum(),
    correct=(correct * weights).sum(),
    weight=weights.sum(),
  )


def location_smoothing(config):
  """`token_loss`'s `locations` for an experiment config: None where
  `location_sigma` is 0 (or absent, in configs saved before it)."""
  sigma = float(config.get("location_sigma", 0.0))
  if sigma < 0:
    raise ValueError(f"location_sigma = {sigma}: expected >= 0 (cells; 0 = one-hot targets)")
  if sigma == 0:
    return None
  model = config.model
  return model_config.first_location_id(model), model.text.num_patches_per_side, sigma


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  *,
  accumulation: int = 1,
  z_loss: float = 0.0,
  max_bad_steps: int = 5,
  trainable=None,
  locations=None,
) -> Callable:
  """(state, batch) -> (state, metrics), to be jitted with shardings by the caller.

  `trainable` (regexes, `optim.trainable_patterns`; the state must be built
  with the same): only those parameters get gradients and updates, the rest
  pass through untouched, so no gradient or optimizer memory is spent on them.
  """

  def loss_fn(params, frozen, micro, rng):
    if frozen is not None:
      params = nnx.merge_state(params, frozen)
    model = nnx.merge(graphdef, params)
    # The adapters' dropout draws from a key of its own (models/lora.py).
    with lora.dropout_key(jax.random.fold_in(rng, 1)):
      logits = model(**{k: micro[k] for k in MODEL_INPUTS if k in micro}, dropout_rng=rng).logits
    sums = token_loss(logits, micro, z_loss, locations)
    return sums["loss"] + sums["z_loss"], sums

  def step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.rng)
    # Explicit sizes: -1 cannot be inferred for an empty feature (0 images per row).
    micro = jax.tree.map(
      lambda x: x.reshape(accumulation, x.shape[0] // accumulation, *x.shape[1:]), batch
    )
    if trainable is None:
      params, frozen = state.params, None
    else:
      params, frozen = optim.split_trainable(state.params, trainable)

    def accumulate(carry, xs):
      grads, sums = carry
      m, r = xs
      (_, s), g = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, m, r)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_sums = dict(loss=0.0, z_loss=0.0, correct=0.0, weight=0.0)
    (grads, sums), _ = jax.lax.scan(
      accumulate,
      (zeros, jax.tree.map(jnp.float32, zero_sums)),
      (micro, jax.random.split(step_rng, accumulation)),
    )
    # Normalise by the tokens of the whole (accumulated) batch: every token
    # weighs the same whatever microbatch it fell into.
    denom = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    loss = sums["loss"] / denom
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # A non-finite step leaves parameters and optimizer state as they were.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = keep(new_params, params)
    if frozen is not None:
      new_params = nnx.merge_state(new_params, frozen)
    bad = jnp.where(finite, 0, state.bad_in_a_row + 1)
    new_state = state.replace(
      step=state.step + 1,
      params=new_params,
      opt_state=keep(new_opt, state.opt_state),
      rng=rng,
      skipped=state.skipped + (~finite).astype(jnp.int32),
      bad_in_a_row=bad,
    )
    metrics = dict(
      loss=loss,
      z_loss=sums["z_loss"] / denom,
      accuracy=sums["correct"] / denom,
      tokens=sums["weight"],
      grad_norm=grad_norm,
      finite=finite,
      skipped=new_state.skipped,
      stop=bad >= max_bad_steps,
    )
    return new_state, metrics

  return step


def make_eval_step(graphdef) -> Callable:
  """(params, batch) -> sums of loss, correct and weight (no dropout)."""

  def step(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
    return token_loss(logits, batch)

  return step
