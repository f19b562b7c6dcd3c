"""The train step: it learns, accumulates exactly, skips non-finite steps, shards exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import spmd

from kosmos_jax import config as config_lib
from kosmos_jax import sharding
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.train import optim
from kosmos_jax.train import state as state_lib
from kosmos_jax.train import step as step_lib
from tests.helpers.batches import packed_batch

NO_DROPOUT = ["model.text.dropout=0.0", "model.text.attention_dropout=0.0"]


def _setup(overrides=()):
  config = config_lib.load(
    "configs/tiny.py",
    ["batch_size=4", "seq_len=32", "optim.warmup_steps=2", "optim.learning_rate=3e-3", *overrides],
  )
  model = Kosmos2(config.model, rngs=nnx.Rngs(config.seed))
  graphdef = nnx.graphdef(model)
  tx = optim.optimizer(config.optim, config.total_steps)
  state = state_lib.create(nnx.state(model, nnx.Param), tx, config.seed)
  train_step = step_lib.make_train_step(
    graphdef, tx, accumulation=config.accumulation, max_bad_steps=config.max_bad_steps
  )
  return config, state, train_step


def test_location_targets_are_a_gaussian_over_the_grid():
  """`locations`: a location target scores the expected log-probability under
  a normalised Gaussian over the grid around its cell (float64 reference);
  other targets and the accuracy are the one-hot ones."""
  rng = np.random.default_rng(0)
  side, first, vocab = 4, 7, 7 + 16 + 2  # two rows after the grid (modality tags)
  logits = jnp.asarray(rng.normal(size=(2, 6, vocab)), jnp.float32)
  targets = np.array([[3, 7, 12, 22, 1, 23], [8, 13, 19, 0, 9, 24]])
  batch = dict(targets=jnp.asarray(targets), loss_weights=jnp.ones((2, 6)))
  sigma = 0.8
  x = np.asarray(logits, np.float64)
  log_probs = x - x.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  rows, cols = np.divmod(np.arange(side * side), side)
  expected = 0.0
  for (i, j), t in np.ndenumerate(targets):
    cell = t - first
    if 0 <= cell < side * side:
      r, c = divmod(cell, side)
      q = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
      q = q / np.exp(-((np.arange(side)[:, None] - r) ** 2) / (2 * sigma**2)).sum()
      q = q / np.exp(-((np.arange(side) - c) ** 2) / (2 * sigma**2)).sum()
      np.testing.assert_allclose(q.sum(), 1.0)
      expected -= (q * log_probs[i, j, first : first + side * side]).sum()
    else:
      expected -= log_probs[i, j, t]
  soft = step_lib.token_loss(logits, batch, locations=(first, side, sigma))
  hard = step_lib.token_loss(logits, batch)
  np.testing.assert_allclose(float(soft["loss"]), expected, rtol=1e-5)
  assert float(soft["correct"]) == float(hard["correct"])
  # A narrow Gaussian is the one-hot target.
  narrow = step_lib.token_loss(logits, batch, locations=(first, side, 1e-3))
  np.testing.assert_allclose(float(narrow["loss"]), float(hard["loss"]), rtol=1e-6)
  # The gradient is the soft target's: softmax minus q sums to zero per token.
  grads = jax.grad(lambda x: step_lib.token_loss(x, batch, locations=(first, side, sigma))["loss"])
  np.testing.assert_allclose(np.asarray(grads(logits)).sum(-1), 0.0, atol=1e-5)


def test_location_smoothing_reads_the_config():
  config = config_lib.load("configs/tiny.py")
  assert step_lib.location_smoothing(config) is None
  config.location_sigma = 0.5
  side = config.model.text.num_patches_per_side
  first = config.model.text.vocab_size - side * side
  assert step_lib.location_smoothing(config) == (first, side, 0.5)
  config.location_sigma = -1.0
  with pytest.raises(ValueError, match="location_sigma"):
    step_lib.location_smoothing(config)


def test_loss_goes_down_and_metrics_are_sane():
  config, state, train_step = _setup()
  step = jax.jit(train_step)
  batch = packed_batch(config)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.5
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0
  assert float(metrics["tokens"]) == batch["loss_weights"].sum()
  assert int(state.step) == 8 and int(state.skipped) == 0


def test_loss_counts_weighted_targets_only():
  logits = jnp.zeros((1, 4, 10)).at[0, 1, 6].set(5.0)
  batch = dict(targets=jnp.array([[5, 6, 7, 1]]), loss_weights=jnp.array([[0.0, 1.0, 1.0, 0.0]]))
  sums = step_lib.token_loss(logits, batch, z_loss=1e-4)
  assert float(sums["weight"]) == 2.0 and float(sums["correct"]) == 1.0
  lse = np.log(9 + np.exp(5.0))
  np.testing.assert_allclose(float(sums["loss"]), (lse - 5.0) + np.log(10), rtol=1e-6)
  np.testing.assert_allclose(float(sums["z_loss"]), 1e-4 * (lse**2 + np.log(10) ** 2), rtol=1e-5)


def test_loss_gradient_matches_softmax_cross_entropy():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
  batch = dict(
    targets=jnp.asarray(rng.integers(0, 11, (2, 5))),
    loss_weights=jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32),
  )
  z = 1e-3

  def ours(x):
    sums = step_lib.token_loss(x, batch, z_loss=z)
    return sums["loss"] + sums["z_loss"]

  def reference(x):
    xent = optax.softmax_cross_entropy_with_integer_labels(x, batch["targets"])
    lse = jax.nn.logsumexp(x, axis=-1)
    return ((xent + z * lse**2) * batch["loss_weights"]).sum()

  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-6)
  correct = (logits.argmax(-1) == batch["targets"]) * batch["loss_weights"]
  assert float(step_lib.token_loss(logits, batch)["correct"]) == float(correct.sum())


def test_accumulation_matches_one_big_batch():
  config, state1, step1 = _setup(NO_DROPOUT)
  _, state2, step2 = _setup(NO_DROPOUT + ["accumulation=2"])
  batch = packed_batch(config)
  for _ in range(2):
    state1, m1 = jax.jit(step1)(state1, batch)
    state2, m2 = jax.jit(step2)(state2, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state2.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_non_finite_step_is_skipped_and_counted():
  config, state, train_step = _setup(["max_bad_steps=2"])
  step = jax.jit(train_step)
  batch = packed_batch(config)
  state, _ = step(state, batch)
  bad = dict(batch, pixel_values=np.full_like(batch["pixel_values"], np.nan))
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, bad)
  assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1
  assert not bool(metrics["stop"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  state, metrics = step(state, bad)
  assert bool(metrics["stop"])  # two in a row: the trainer stops with a message
  state, metrics = step(state, batch)
  assert bool(metrics["finite"]) and int(state.bad_in_a_row) == 0


def test_frozen_layers_do_not_move():
  config, state, train_step = _setup(
    ['optim.freeze=["vision_model/(?!layers/).*", "vision_model/layers/.*@:-1"]']
  )
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
  state, _ = jax.jit(train_step)(state, packed_batch(config))
  state, _ = jax.jit(train_step)(state, packed_batch(config, seed=1))
  after = nnx.to_pure_dict(state.params)
  vision, vision0 = after["vision_model"], before["vision_model"]
  np.testing.assert_array_equal(vision["pre_layrnorm"]["scale"], vision0["pre_layrnorm"]["scale"])
  np.testing.assert_array_equal(
    vision["layers"]["fc1"]["kernel"][0], vision0["layers"]["fc1"]["kernel"][0]
  )
  assert (
    np.abs(vision["layers"]["fc1"]["kernel"][-1] - vision0["layers"]["fc1"]["kernel"][-1]).max() > 0
  )
  assert (
    np.abs(
      after["text_model"]["layers"]["fc1"]["kernel"]
      - before["text_model"]["layers"]["fc1"]["kernel"]
    ).max()
    > 0
  )


def test_weight_decay_skips_norms_and_biases():
  config, state, _ = _setup()
  tx = optim.optimizer(config.optim, 10)
  zero_grads = jax.tree.map(jnp.zeros_like, state.params)
  opt_state = tx.init(state.params)
  update = jax.jit(tx.update)  # op by op, each of AdamW's ops compiles on its own
  for _ in range(3):  # past warmup, the learning rate is non-zero
    updates, opt_state = update(zero_grads, opt_state, state.params)
  flat = {optim.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert not np.asarray(flat["text_model/layer_norm/scale"]).any()
  assert not np.asarray(flat["text_model/layers/fc1/bias"]).any()
  assert np.asarray(flat["text_model/layers/fc1/kernel"]).any()


def test_lr_multipliers_scale_matching_updates():
  config, state, _ = _setup(["optim.weight_decay=0.1"])
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)

  def updates(multipliers):
    config.optim.lr_multipliers = multipliers
    tx = optim.optimizer(config.optim, 10)
    opt_state = tx.init(state.params)
    for _ in range(3):  # past warmup
      out, opt_state = tx.update(grads, opt_state, state.params)
    return {
      optim.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(out)[0]
    }

  base = updates([])
  scaled = updates(["vision_model/.*=3", "vision_model/post_layernorm/.*=0", ".*fc1/kernel=0.5"])
  for name, value in base.items():
    if name.startswith("vision_model/"):
      want = 3 * value  # the first match counts: post_layernorm's 0 comes too late
    elif name.endswith("fc1/kernel"):
      want = 0.5 * value
    else:
      want = value
    np.testing.assert_allclose(scaled[name], want, rtol=1e-6, err_msg=name)
  assert np.abs(base["vision_model/post_layernorm/scale"]).max() > 0
  with pytest.raises(ValueError, match="'vision_model': expected 'REGEX=FACTOR'"):
    updates(["vision_model"])


def test_sharded_8_devices_equals_one_device():
  """data=2, fsdp=2, tensor=2 on 8 host devices gives the single-device losses."""
  config, state, train_step = _setup(
    NO_DROPOUT + ["batch_size=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  )
  batches = [packed_batch(config, seed=s) for s in range(5)]
  single = jax.jit(train_step)
  ref_state, ref_losses = state, []
  for batch in batches:
    ref_state, metrics = single(ref_state, batch)
    ref_losses.append(float(metrics["loss"]))

  mesh = sharding.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  rules = sharding.rules_of(config)
  state_sharding = sharding.train_state_shardings(state, mesh, rules)
  batch_sharding = {k: sharding.batch_sharding(mesh, rules, v.shape) for k, v in batches[0].items()}
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    sharded = jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, None),
      donate_argnums=0,
    )
    state = jax.device_put(state, state_sharding)
    losses = []
    for batch in batches:
      state, metrics = sharded(state, jax.device_put(batch, batch_sharding))
      losses.append(float(metrics["loss"]))
  fc1 = state.params["text_model"]["layers"]["fc1"]["kernel"]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
