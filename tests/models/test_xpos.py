"""xPos (text.position="xpos"): torchscale's formula, relativity, and the
model paths that must agree with it (packing, KV cache, attention kernels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import hf
from kosmos_jax.models import build, xpos
from kosmos_jax.models.kosmos import Kosmos2

CPU_KERNELS = ["pallas", "splash"]  # as tests/models/test_attention.py: interpreted on CPU


def _torchscale_xpos(x, offset, downscale):
  """torchscale's XPOS.forward on x [length, d] in float64, written from its formula."""
  length, d = x.shape
  total = length + offset
  min_pos = -total // 2
  zeta = (np.arange(0, d, 2) + 0.4 * d) / (1.4 * d)
  scale = zeta ** (np.arange(min_pos, min_pos + total)[:, None] / 512)[-length:]
  inv_freq = 1.0 / 10000 ** (np.arange(d // 2) / (d // 2))
  angles = (np.arange(total)[:, None] * inv_freq)[-length:]
  if downscale:
    scale = 1.0 / scale
  sin = np.repeat(np.sin(angles) * scale, 2, axis=-1)  # duplicate_interleave
  cos = np.repeat(np.cos(angles) * scale, 2, axis=-1)
  turned = np.stack([-x[:, 1::2], x[:, 0::2]], axis=-1).reshape(x.shape)  # rotate_every_two
  return x * cos + turned * sin


@pytest.mark.parametrize("offset", [0, 7, 1500])
@pytest.mark.parametrize("downscale", [False, True])
def test_rotation_and_scale_match_torchscale(offset, downscale):
  length, heads, d = 9, 2, 16
  x = np.random.default_rng(offset).standard_normal((1, length, heads, d))
  # torchscale's centring for this call (-min_pos); the model's is fixed (xpos.py).
  center = -(-(length + offset) // 2)
  positions = offset + jnp.arange(length)[None]
  got = xpos.rotate(jnp.asarray(x, jnp.float32), positions, downscale=downscale, center=center)
  for h in range(heads):
    want = _torchscale_xpos(x[0, :, h], offset, downscale)
    # float32 angles of up to 1500 rad carry ~1e-4 rad of rounding.
    np.testing.assert_allclose(got[0, :, h], want, atol=3e-4 * np.abs(want).max())


def _logits(q, k, positions, center=1024):
  q = xpos.rotate(q, positions, downscale=False, center=center)
  k = xpos.rotate(k, positions, downscale=True, center=center)
  return np.asarray(jnp.einsum("bqhd,bkhd->bhqk", q, k))


def test_logits_depend_only_on_distance():
  q, k = jax.random.normal(jax.random.key(0), (2, 2, 12, 3, 32))
  base = jnp.tile(jnp.arange(12), (2, 1))
  ref = _logits(q, k, base)
  # A shift per row, of either sign around the centre, changes nothing.
  np.testing.assert_allclose(_logits(q, k, base + jnp.array([[5], [300]])), ref, atol=1e-4)
  # Far from 0 the float32 angles n * theta round by ~1e-4 rad.
  far = _logits(q, k, base + jnp.array([[-900], [1700]]))
  np.testing.assert_allclose(far, ref, atol=1e-3)
  assert np.abs(ref - np.asarray(jnp.einsum("bqhd,bkhd->bhqk", q, k))).max() > 0.1
  # Other distances do change them.
  assert np.abs(_logits(q, k, base * 3) - ref).max() > 0.1


@nnx.jit
def _forward(model, ids, segment_ids=None, position_ids=None):
  # Compiled once per shape: eager calls of the model take seconds each.
  return model(ids, segment_ids=segment_ids, position_ids=position_ids).logits


@pytest.fixture(scope="module")
def tiny_xpos():
  config = config_lib.load("configs/tiny.py").model
  config.text.position = "xpos"
  model = Kosmos2(config, rngs=nnx.Rngs(0))
  # Random signs in the last LayerNorm: with the head tied to the embeddings
  # a random model otherwise predicts its input token again and again. And
  # q, k 4x std 0.02: near-uniform attention would make positions matter so
  # little that a cache with wrong positions still decoded the same tokens.
  text = model.text_model
  text.layer_norm.scale[...] = jax.random.normal(jax.random.key(1), text.layer_norm.scale.shape)
  for kernel in (text.layers.self_attn.q_proj.kernel, text.layers.self_attn.k_proj.kernel):
    kernel[...] = kernel[...] * 4.0
  return config, model


def test_no_absolute_positions_and_positions_reach_attention(tiny_xpos):
  _, model = tiny_xpos
  ids = np.random.default_rng(1).integers(5, 1000, (1, 6)).astype(np.int32)
  at = lambda p: np.asarray(_forward(model, ids, position_ids=np.asarray([p], np.int32)))
  ref = at([2, 3, 4, 5, 6, 7])
  np.testing.assert_allclose(at([40, 41, 42, 43, 44, 45]), ref, atol=1e-4)
  np.testing.assert_allclose(np.asarray(_forward(model, ids)), ref, atol=1e-4)  # the default
  assert np.abs(at([2, 3, 4, 9, 10, 11]) - ref).max() > 1e-3


def test_packed_segment_equals_the_segment_alone(tiny_xpos):
  _, model = tiny_xpos
  rng = np.random.default_rng(0)
  a, b = rng.integers(100, 900, 5), rng.integers(100, 900, 4)
  packed = np.concatenate([a, b])[None].astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 4])
  positions = np.array([[2, 3, 4, 5, 6, 2, 3, 4, 5]])
  out = np.asarray(_forward(model, packed, segments, positions))
  alone = np.asarray(_forward(model, b[None].astype(np.int32)))
  np.testing.assert_allclose(out[0, 5:], alone[0], atol=1e-4)


def test_cached_greedy_generation_equals_uncached_argmax(tiny_xpos):
  _, model = tiny_xpos
  rng = np.random.default_rng(2)
  rows = [[0, *rng.integers(20, 1000, n)] for n in (2, 6, 4)]
  width, new = max(map(len, rows)), 10
  ids = np.ones((len(rows), width), np.int64)  # left padded with pad id 1
  for i, row in enumerate(rows):
    ids[i, width - len(row) :] = row
  got = model.generate(ids, attention_mask=(ids != 1).astype(np.int64), max_new_tokens=new)
  # The reference: each row alone from column 0, the whole sequence again
  # each step, no cache. Causal, so the columns after a row's end (pads)
  # change nothing before it, and one shape serves every row and step.
  seqs = np.ones((len(rows), width + new), np.int32)
  ends = np.array([len(r) for r in rows])
  for i, row in enumerate(rows):
    seqs[i, : len(row)] = row
  done = np.zeros(len(rows), bool)
  for _ in range(new):
    logits = np.asarray(_forward(model, seqs))
    token = np.where(done, 1, logits[np.arange(len(rows)), ends - 1].argmax(-1))
    seqs[np.arange(len(rows)), ends] = token
    ends, done = ends + 1, done | (token == 2)
  assert got.shape[1] == width + new or done.all()
  for i, row in enumerate(rows):
    want = seqs[i, len(row) : len(row) + got.shape[1] - width]
    np.testing.assert_array_equal(got[i, width:], want)


@pytest.mark.parametrize("implementation", CPU_KERNELS)
def test_attention_kernels_match_xla(tiny_xpos, implementation):
  config, model = tiny_xpos
  rng = np.random.default_rng(3)
  ids = rng.integers(5, 1000, (2, 12)).astype(np.int32)
  ids[1, :4] = 1  # left padding
  segments = (ids != 1).astype(np.int32)
  segments[0, 7:] = 2  # row 0 packs two sequences
  positions = np.where(segments == 0, 1, np.arange(12) + 2)
  positions[0, 7:] = np.arange(5) + 2
  inputs = dict(segment_ids=segments, position_ids=positions)
  ref = np.asarray(model(ids, **inputs).logits)
  kernel_config = config.copy_and_resolve_references()
  kernel_config.attention = implementation
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  got = np.asarray(build.model_from_params(kernel_config, params)(ids, **inputs).logits)
  real = segments.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=2e-4 * np.abs(ref).max())


def test_unknown_position_and_hf_conversion_are_refused(tiny_xpos):
  config, _ = tiny_xpos
  with pytest.raises(hf.ConversionError, match="text.position='xpos'"):
    hf.config_to_hf(config)
  with pytest.raises(hf.ConversionError, match="text.position='xpos'"):
    hf.key_map(config)
  bad = config.copy_and_resolve_references()
  bad.text.position = "rope"
  with pytest.raises(ValueError, match="text.position 'rope'"):
    Kosmos2(bad, rngs=nnx.Rngs(0))
