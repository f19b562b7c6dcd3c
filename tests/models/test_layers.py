"""LayerNorm and GELU: custom backward passes against float64 autodiff, and what
a bfloat16 train step saves for its backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src import ad_checkpoint

from kosmos_jax.config import experiment_config
from kosmos_jax.models import layers
from kosmos_jax.models.batch import MODEL_INPUTS
from kosmos_jax.models.config import model_config
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.train import step as step_lib
from tests.helpers.batches import packed_batch


def _reference_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _reference_gelu(x):
  return 0.5 * x * (1 + jax.lax.erf(x / np.sqrt(2.0)))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  # An offset and a spread like a residual stream's, so mean and variance matter.
  x = rng.normal(size=(3, 5, 16)) * 2.5 + 0.7
  scale, bias = rng.normal(size=16), rng.normal(size=16)
  dout = rng.normal(size=(3, 5, 16))
  return x, scale, bias, dout


def test_layer_norm_and_gelu_gradients_match_float64_autodiff():
  x, scale, bias, dout = _inputs()
  with jax.enable_x64(True):
    wide = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias, dout)]
    want_ln, vjp = jax.vjp(lambda *a: _reference_layer_norm(*a, 1e-5), *wide[:3])
    want_ln_grads = vjp(wide[3])
    want_gelu, vjp = jax.vjp(_reference_gelu, wide[0])
    (want_gelu_grad,) = vjp(wide[3])
  f32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias, dout)]
  got_ln, vjp = jax.vjp(lambda *a: layers.layer_norm(*a, 1e-5, jnp.float32), *f32[:3])
  got_ln_grads = vjp(f32[3])
  np.testing.assert_allclose(got_ln, want_ln, rtol=1e-5, atol=1e-5)
  for got, want in zip(got_ln_grads, want_ln_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  got_gelu, vjp = jax.vjp(layers.gelu_exact, f32[0])
  np.testing.assert_allclose(got_gelu, want_gelu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vjp(f32[3])[0], want_gelu_grad, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_bfloat16_gradients():
  x, scale, bias, dout = (jnp.asarray(a, jnp.bfloat16) for a in _inputs(1))
  out, vjp = jax.vjp(lambda *a: layers.layer_norm(*a, 1e-5, jnp.bfloat16), x, scale, bias)
  assert out.dtype == jnp.bfloat16
  assert [g.dtype for g in vjp(dout)] == [jnp.bfloat16] * 3
  out, vjp = jax.vjp(layers.gelu_exact, x)
  assert out.dtype == vjp(dout)[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_a_bfloat16_step_saves_no_float32_activations(remat):
  """The backward pass keeps only bfloat16 activations, besides the float32
  logits the loss reads: autodiff of the float32 LayerNorm, GELU and softmax
  once saved float32 copies of each (99 of the 132 GiB saved per step at the
  released size, benchmarks/memory.py)."""
  config = experiment_config(
    model_config(
      dtype="bfloat16",
      remat=remat,
      # The flash kernel, as on accelerators: the xla path keeps its float32
      # attention probabilities, [batch, heads, length, length] in any case.
      attention="pallas",
      **{
        "text.width": 32,
        "text.depth": 2,
        "text.heads": 2,
        "text.ffn_dim": 64,
        "text.vocab_size": 300,
        "text.max_positions": 64,
        "vision.width": 32,
        "vision.depth": 2,
        "vision.heads": 2,
        "vision.mlp_dim": 64,
        "vision.image_size": 32,
        "vision.patch_size": 8,
        "latent_query_num": 4,
      },
    )
  )
  config.batch_size, config.seq_len, config.images_per_row = 2, 48, 1
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = packed_batch(config)

  def loss(params):
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = nnx.merge(graphdef, params)(**inputs).logits
    return step_lib.token_loss(logits, batch)["loss"]

  m = config.model
  widths = {m.text.width, m.text.ffn_dim, m.vision.width, m.vision.mlp_dim}
  saved = ad_checkpoint.saved_residuals(loss, params)
  in_layers = [aval.str_short() for aval, where in saved if "(scan)" in where]
  float32 = [
    (aval.str_short(), where)
    for aval, where in saved
    if "(scan)" in where and aval.dtype == jnp.float32 and aval.shape[-1] in widths
  ]
  assert in_layers and not float32, float32
