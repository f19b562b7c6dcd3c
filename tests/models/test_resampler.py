"""The Perceiver resampler connector (`model.connector = "perceiver"`):
numerics against a float64 numpy reference, size, and the model around it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import hf
from kosmos_jax.models import build, resampler
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.train import step as step_lib
from tests.helpers.batches import packed_batch

EPS = 1e-5


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * scale + bias


def _gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _reference(p, features, heads):
  """Flamingo's resampler in float64 numpy, from the parameter dict alone."""
  media = features @ p["dense"]["kernel"] + p["dense"]["bias"]
  x = np.broadcast_to(p["latent_query"], (len(features), *p["latent_query"].shape))
  blocks = p["layers"]
  for i in range(blocks["q_proj"]["kernel"].shape[0]):
    w = jax.tree.map(lambda a, i=i: a[i], blocks)
    ln = lambda t, name, w=w: _layer_norm(t, w[name]["scale"], w[name]["bias"])
    lat = ln(x, "latent_layer_norm")
    kv = np.concatenate([ln(media, "media_layer_norm"), lat], axis=1)
    q, k, v = lat @ w["q_proj"]["kernel"], kv @ w["k_proj"]["kernel"], kv @ w["v_proj"]["kernel"]
    out = []
    for h in np.split(np.arange(q.shape[-1]), heads):
      logits = q[..., h] @ k[..., h].transpose(0, 2, 1) / np.sqrt(len(h))
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      out.append(probs / probs.sum(-1, keepdims=True) @ v[..., h])
    x = x + np.concatenate(out, -1) @ w["out_proj"]["kernel"]
    h = _gelu(ln(x, "ffn_layer_norm") @ w["fc1"]["kernel"] + w["fc1"]["bias"])
    x = x + h @ w["fc2"]["kernel"] + w["fc2"]["bias"]
  return _layer_norm(x, p["layer_norm"]["scale"], p["layer_norm"]["bias"])


def _small(depth=2, heads=3, head_dim=4, ffn_mult=4, remat="none", dtype=jnp.float32):
  """A resampler (vision width 12, text width 16, 5 latents) with random values
  everywhere, norm scales and biases included, so every parameter shows in the
  output; built from the abstract module, which skips the slow eager init."""
  cfg = ml_collections.ConfigDict(
    dict(depth=depth, heads=heads, head_dim=head_dim, ffn_mult=ffn_mult)
  )
  make = lambda: resampler.PerceiverResampler(
    12,
    16,
    5,
    cfg,
    rngs=nnx.Rngs(0),
    dtype=dtype,
    param_dtype=jnp.float32,
    eps=EPS,
    remat=remat,
    attention="xla",
    attention_dropout=0.1,
  )
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(1)
  pure = jax.tree.map(
    lambda a: (0.5 * rng.standard_normal(a.shape)).astype(np.float32), nnx.to_pure_dict(state)
  )
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return nnx.merge(graphdef, state), pure


def test_forward_matches_a_float64_reference():
  module, pure = _small()
  features = np.random.default_rng(0).standard_normal((2, 7, 12)).astype(np.float32)
  got = np.asarray(module(jnp.asarray(features)))
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), pure)
  want = _reference(p64, features.astype(np.float64), heads=3)
  assert got.shape == (2, 5, 16)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # bfloat16 compute (float32 master weights) follows, as the other towers do.
  bf16, _ = _small(dtype=jnp.bfloat16)
  low = bf16(jnp.asarray(features))
  assert low.dtype == jnp.bfloat16 and bf16.latent_query[...].dtype == jnp.float32
  assert np.abs(np.asarray(low, np.float64) - want).max() < 0.05 * np.abs(want).max()


def test_remat_changes_nothing_and_dropout_needs_an_rng():
  features = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 12)), jnp.float32)
  plain, _ = _small()
  remat, _ = _small(remat="full")
  loss = lambda m: jnp.square(m(features)).mean()
  grad = nnx.jit(nnx.grad(loss))
  g1, g2 = grad(plain), grad(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # Attention dropout (the connector's text.attention_dropout) only with an rng.
  train = np.asarray(plain(features, jax.random.key(0)))
  assert np.abs(train - np.asarray(plain(features))).max() > 1e-3


def _resampler_params(d, vision, latents, depth, heads, head_dim, mult):
  inner, ffn = heads * head_dim, mult * d
  layer = 3 * 2 * d + 4 * d * inner + (d * ffn + ffn) + (ffn * d + d)
  return vision * d + d + latents * d + depth * layer + 2 * d


def test_parameter_count_matches_the_formula():
  _, pure = _small(depth=3, heads=2, head_dim=8, ffn_mult=3)
  count = sum(x.size for x in jax.tree.leaves(pure))
  assert count == _resampler_params(16, 12, 5, depth=3, heads=2, head_dim=8, mult=3)
  # The full-size model: the connector swap changes the count by exactly the
  # difference between the two connectors (kosmos2's: dense, latents, q/k/v/out with bias).
  base = config_lib.load("configs/kosmos2.py").model
  per = base.copy_and_resolve_references()
  per.connector = "perceiver"
  d, vw, n, pc = base.text.width, base.vision.width, base.latent_query_num, base.perceiver
  kosmos2 = vw * d + d + n * d + 4 * (d * d + d)
  perceiver = _resampler_params(d, vw, n, pc.depth, pc.heads, pc.head_dim, pc.ffn_mult)
  assert build.param_count(per) - build.param_count(base) == perceiver - kosmos2


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.load("configs/tiny.py")
  config.model.connector = "perceiver"
  config.model.perceiver.update(depth=2, heads=2, head_dim=16)
  return config


@pytest.fixture(scope="module")
def model(tiny):
  return Kosmos2(tiny.model, rngs=nnx.Rngs(1))


def test_parameters_carry_logical_axes(tiny):
  state = nnx.state(build.abstract_model(tiny.model).image_to_text_projection, nnx.Param)
  for path, var in jax.tree_util.tree_flatten_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]:
    assert len(var.get_metadata()["out_sharding"]) == var.get_value().ndim, path
  axes = lambda v: v.get_metadata()["out_sharding"]
  assert axes(state["layers"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
  assert axes(state["layers"]["fc2"]["kernel"]) == ("layers", "mlp", "embed")
  assert axes(state["latent_query"]) == (None, "embed")


def test_encode_images_keeps_the_contract(tiny, model):
  s = tiny.model.vision.image_size
  pixels = np.random.default_rng(0).standard_normal((3, 2, 3, s, s)).astype(np.float32)
  embeds = model.encode_images(pixels)
  n = tiny.model.latent_query_num
  assert embeds.shape == (3, 2 * n, tiny.model.text.width)
  # Slots differ within a picture and between pictures.
  e = np.asarray(embeds)
  assert np.abs(e[0, 0] - e[0, 1]).max() > 1e-2
  assert np.abs(e[0, :n] - e[0, n:]).max() > 1e-3


def test_model_trains_and_generates(tiny, model):
  batch = packed_batch(tiny, batch_size=2)
  inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "image_embeds_position_mask")}
  inputs.update(segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])

  def loss(m):
    logits = m(**inputs, dropout_rng=jax.random.key(0)).logits
    sums = step_lib.token_loss(logits, batch)
    return sums["loss"] / sums["weight"]

  value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
  assert np.isfinite(float(value))
  for path, g in jax.tree_util.tree_flatten_with_path(grads["image_to_text_projection"])[0]:
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)
  prompt = {k: v[:, : 3 + tiny.model.latent_query_num] for k, v in inputs.items()}
  out = model.generate(
    prompt["input_ids"],
    inputs["pixel_values"],
    np.ones_like(prompt["input_ids"]),
    prompt["image_embeds_position_mask"],
    max_new_tokens=3,
  )
  assert out.shape[1] <= prompt["input_ids"].shape[1] + 3
  np.testing.assert_array_equal(out[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])


def test_hugging_face_conversion_refuses_the_perceiver(tiny):
  with pytest.raises(hf.ConversionError, match="model.connector='perceiver'"):
    hf.key_map(tiny.model)
  with pytest.raises(hf.ConversionError, match="model.connector='perceiver'"):
    hf.config_to_hf(tiny.model)


def test_unknown_connector_is_an_error(tiny):
  cfg = tiny.model.copy_and_resolve_references()
  cfg.connector = "qformer"
  with pytest.raises(ValueError, match="model.connector 'qformer'"):
    build.abstract_model(cfg)
