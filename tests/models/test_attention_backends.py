"""Every attention implementation runs the whole model: a training step and generation.

The kernels run only on the accelerators they are written for, so a call that
drifts from the others (a renamed argument, a mask cuDNN does not take) would
otherwise surface first in a GPU or TPU job. Here pallas and splash run in
interpret mode, and cudnn behind a stand-in for jax.nn.dot_product_attention
that checks what cuDNN's flash attention accepts and then computes with XLA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.models import attention, build
from kosmos_jax.models.batch import MODEL_INPUTS
from kosmos_jax.models.kosmos import Kosmos2
from tests.helpers.batches import packed_batch

KERNELS = [impl for impl in attention.IMPLEMENTATIONS if impl != "xla"]
# cuDNN has no float32 flash attention, so its model runs in bfloat16; the
# reference is always xla in float32 (compiled once for all).
DTYPES = {"pallas": "float32", "splash": "float32", "cudnn": "bfloat16"}
# Largest error in logits and in each gradient, relative to the largest
# entry: float32 differs in summation order only, bfloat16 rounds every
# activation (a lost segment mask errs by more than 0.2).
TOLERANCE = {"float32": 1e-4, "bfloat16": 6e-2}


def _config(dtype):
  config = config_lib.load("configs/tiny.py")
  config.seq_len = 32  # two packed sequences and padding per row
  config.model.dtype = dtype
  config.model.text.attention_dropout = 0.0  # the kernels have none
  return config


@pytest.fixture(scope="module")
def params():
  """Random weights (float32 for every dtype), shared by every implementation."""
  return nnx.to_pure_dict(nnx.state(Kosmos2(_config("float32").model, rngs=nnx.Rngs(0)), nnx.Param))


def _model(impl, dtype, params):
  config = _config(dtype)
  config.model.attention = impl
  return build.model_from_params(config.model, params)


@pytest.fixture(autouse=True)
def cudnn_calls(monkeypatch):
  """Replaces jax.nn.dot_product_attention (attention.py looks it up at call
  time) with a check of what its cuDNN path accepts (jax/_src/cudnn/
  fused_attention_stablehlo.py: check_layout, check_is_flash_attention) and
  the same computation by XLA. Returns the calls, as (q shape, mask shape,
  is_causal)."""
  real = jax.nn.dot_product_attention
  calls = []

  def fake(query, key, value, bias=None, mask=None, *, is_causal=False, implementation=None, **kw):
    assert implementation == "cudnn", implementation
    assert query.dtype in (jnp.bfloat16, jnp.float16), query.dtype
    assert query.dtype == key.dtype == value.dtype
    b, t, n, h = query.shape  # BTNH
    s = key.shape[1]
    assert key.shape == value.shape == (b, s, n, h)
    assert h % 8 == 0 and h <= 256, h
    for lengths in (kw.get("query_seq_lengths"), kw.get("key_value_seq_lengths")):
      assert lengths is None or (lengths.dtype == jnp.int32 and lengths.shape == (b,))
    if mask is not None:
      # Becomes a dense bias; in training its gradient needs even lengths.
      assert mask.dtype == jnp.bool_ and mask.ndim == 4, (mask.dtype, mask.shape)
      assert mask.shape[0] in (1, b) and mask.shape[1] in (1, n) and mask.shape[2:] == (t, s)
      assert t % 2 == 0 and s % 2 == 0, (t, s)
    calls.append((query.shape, None if mask is None else mask.shape, is_causal))
    return real(query, key, value, bias, mask, is_causal=is_causal, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  return calls


@nnx.jit
def _loss_and_grads(model, batch):
  """Float32 logits and the parameter gradients of the next-token loss."""
  inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}

  def loss(model):
    logits = model(**inputs).logits.astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)
    return jnp.sum(nll[..., 0] * batch["loss_weights"]), logits

  (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, nnx.to_pure_dict(grads)


def _assert_close(got, ref, tol, what, floor=0.0):
  scale = max(float(np.abs(ref).max()), floor)
  err = float(np.abs(got - ref).max())
  assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def _generate(model):
  """Greedy tokens after image prompts, the second row left padded."""
  latents, vocab = model.config.latent_query_num, model.config.text.vocab_size
  image = [0, vocab - 3, *range(4, 4 + latents), vocab - 2]
  # Text under the padding: the tiny model's greedy tokens hardly depend on
  # attention, but do on a prefill that lets padding in.
  ids = np.array([image + [100, 101, 102], [500, 501, *image, 103]], np.int32)
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  slots = np.zeros_like(ids)
  slots[0, 2 : 2 + latents] = slots[1, 4 : 4 + latents] = 1
  size = model.config.vision.image_size
  pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
  return model.generate(
    ids,
    pixels,
    attention_mask=mask,
    image_embeds_position_mask=slots,
    max_new_tokens=3,
    num_beams=1,
    do_sample=False,
    no_repeat_ngram_size=0,
  )


@pytest.mark.parametrize("impl", KERNELS)
def test_training_step_matches_xla(impl, params, cudnn_calls):
  dtype = DTYPES[impl]
  batch = packed_batch(_config("float32"), batch_size=2)
  padding = batch["segment_ids"] == 0
  assert (batch["segment_ids"].max(1) == 2).all() and padding.any()
  # Text under the padding (whose ids and positions embed to zeros): padding
  # queries must still output zeros, and real ones must not see it.
  batch["input_ids"][padding] = np.random.default_rng(1).integers(100, 1000, padding.sum())
  ref_logits, ref_grads = _loss_and_grads(_model("xla", "float32", params), batch)
  logits, grads = _loss_and_grads(_model(impl, dtype, params), batch)
  tol = TOLERANCE[dtype]
  _assert_close(logits, ref_logits, tol, "logits")
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
  # Some gradients are ~0 (e.g. k_proj's bias: softmax ignores a shift shared
  # by all keys): those are measured against the largest gradient.
  floor = 1e-3 * max(np.abs(r).max() for r in flat_ref.values())
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.isfinite(g).all(), path
    _assert_close(g, flat_ref[path], tol, jax.tree_util.keystr(path), floor)
  # cuDNN: the ViT (17 tokens) mask-free; the packed decoder rows causal with
  # a segment mask.
  vit, decoder = ((2, 17, 4, 8), None, False), ((2, 32, 4, 16), (2, 1, 32, 32), True)
  assert set(cudnn_calls) == ({vit, decoder} if impl == "cudnn" else set())


@pytest.mark.parametrize("impl", KERNELS)
def test_generation_matches_xla(impl, params, cudnn_calls):
  ref = _generate(_model("xla", "float32", params))
  np.testing.assert_array_equal(_generate(_model(impl, DTYPES[impl], params)), ref)
  # cuDNN: the ViT and the prefill (bucketed to 16 tokens, left padded); the
  # decode steps read the cache through xla.
  vit, prefill = ((2, 17, 4, 8), None, False), ((2, 16, 4, 16), (2, 1, 16, 16), True)
  assert set(cudnn_calls) == ({vit, prefill} if impl == "cudnn" else set())


def test_cudnn_refuses_float32():
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  with pytest.raises(ValueError, match="bfloat16"):
    attention.attention(q, q, q, causal=True, implementation="cudnn")
