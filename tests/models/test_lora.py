"""LoRA adapters: added, they change nothing; merged, they equal the adapted model."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.models import build, lora
from kosmos_jax.models.kosmos import Kosmos2
from tests.helpers.batches import packed_batch

TARGETS = [*lora.DEFAULT_TARGETS, "vision_model/layers/fc1", "image_to_text_projection/dense"]


def _config(*overrides):
  return config_lib.load("configs/tiny.py", ["batch_size=2", "seq_len=32", *overrides])


def _inputs(config) -> dict:
  batch = packed_batch(config)
  keys = ("input_ids", "pixel_values", "image_embeds_position_mask", "segment_ids", "position_ids")
  return {k: batch[k] for k in keys if k in batch}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs, key):
  with lora.dropout_key(key):
    return nnx.merge(graphdef, state)(**inputs).logits


def _logits(model, inputs, key=None) -> np.ndarray:
  # Jitted: an eager forward pass dispatches every op on its own, seconds each.
  return np.asarray(_forward(*nnx.split(model), inputs, key))


def _adapted(config, seed=0):
  """The tiny model with adapters on TARGETS whose B is random (as if trained)."""
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  config.lora.rank, config.lora.targets = 4, TARGETS
  lora.add(model, config.lora, lora.adapter_rngs(0))
  key = jax.random.PRNGKey(seed)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, lora.LoraDense):
      key, sub = jax.random.split(key)
      module.lora_b[...] = 0.1 * jax.random.normal(sub, module.lora_b.shape)
  return model


def test_added_adapters_change_nothing():
  config = _config()
  config.lora.rank = 8
  inputs = _inputs(config)
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  before = _logits(model, inputs)
  lora.add(model, config.lora, lora.adapter_rngs(0))
  attn = model.text_model.layers.self_attn
  assert isinstance(attn.q_proj, lora.LoraDense) and isinstance(attn.out_proj, lora.LoraDense)
  assert not isinstance(model.text_model.layers.fc1, lora.LoraDense)
  assert np.abs(np.asarray(attn.q_proj.lora_a[...])).max() > 0  # A random, B zero
  np.testing.assert_array_equal(_logits(model, inputs), before)


def test_stacked_adapters_follow_the_layers_axes():
  config = _config()
  model = _adapted(config)
  q = model.text_model.layers.self_attn.q_proj
  depth, width = config.model.text.depth, config.model.text.width
  assert q.lora_a.shape == (depth, width, 4) and q.lora_b.shape == (depth, 4, width)
  assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
  assert q.lora_b.get_metadata()["out_sharding"] == ("layers", None, "heads")
  out = model.text_model.layers.self_attn.out_proj
  assert out.lora_a.get_metadata()["out_sharding"] == ("layers", "heads", None)
  dense = model.image_to_text_projection.dense
  assert dense.lora_a.get_metadata()["out_sharding"] == (None, None)
  assert dense.lora_b.get_metadata()["out_sharding"] == (None, "embed")
  # Each layer gets its own A, and the base paths are unchanged.
  assert not np.array_equal(q.lora_a[...][0], q.lora_a[...][1])
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "text_model/layers/self_attn/q_proj/kernel" in names
  assert "text_model/layers/self_attn/q_proj/lora_b" in names


def test_merged_model_equals_adapted_model():
  config = _config()
  inputs = _inputs(config)
  model = _adapted(config)
  adapted = _logits(model, inputs)
  plain = _logits(Kosmos2(config.model, rngs=nnx.Rngs(0)), inputs)
  assert np.abs(adapted - plain).max() > 1e-2  # the adapters do something
  merged = lora.merge_params(build.params_of(model), config.lora)
  assert not lora.has_adapters(merged) and lora.has_adapters(build.params_of(model))
  jax.tree.map(
    lambda a, b: None if a.shape == b.shape else pytest.fail("shape"),
    merged,
    build.abstract_params(config.model),
  )
  got = _logits(build.model_from_params(config.model, merged), inputs)
  np.testing.assert_allclose(got, adapted, atol=1e-5, rtol=1e-5)


def test_a_pattern_that_matches_nothing_is_named():
  config = _config()
  config.lora.rank = 4
  config.lora.targets = ["text_model/layers/self_attn/q_proj", "text_model/layers/attn/qproj"]
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\['text_model/layers/attn/qproj'\] match no Dense"):
    lora.add(model, config.lora, lora.adapter_rngs(0))
  config.lora.targets = ["text_model/layers/("]
  with pytest.raises(ValueError, match=r"'text_model/layers/\('"):
    lora.add(model, config.lora, lora.adapter_rngs(0))


def test_rank_zero_is_off():
  config = _config()
  assert not lora.enabled(config.lora) and not lora.enabled(None)
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  assert lora.add(model, config.lora, lora.adapter_rngs(0)) is model
  assert not lora.has_adapters(build.params_of(model))


def test_dropout_needs_the_train_steps_key():
  config = _config()
  config.lora.dropout = 0.5
  model = _adapted(config)
  inputs = _inputs(config)
  plain = _logits(model, inputs)
  np.testing.assert_array_equal(_logits(model, inputs), plain)  # no key: deterministic
  one = _logits(model, inputs, jax.random.PRNGKey(1))
  again = _logits(model, inputs, jax.random.PRNGKey(1))
  two = _logits(model, inputs, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(one, again)
  assert np.abs(one - plain).max() > 1e-3 and np.abs(one - two).max() > 1e-3


def test_dropout_masks_differ_across_stacked_layers():
  config = _config()
  config.lora.dropout = 0.5
  model = _adapted(config)
  q = model.text_model.layers.self_attn.q_proj
  graphdef, state = nnx.split(q)

  def layer_mask(i):
    layer = nnx.merge(graphdef, jax.tree.map(lambda v: v[i], state))
    with lora.dropout_key(jax.random.PRNGKey(0)):
      return np.asarray(layer._dropout_rng())

  assert not np.array_equal(layer_mask(0), layer_mask(1))
