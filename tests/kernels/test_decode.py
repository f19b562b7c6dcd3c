"""Decode attention (interpret mode) against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kosmos_jax import kernels


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_matches_reference_with_ragged_lengths(dtype, tol):
  # 40 cache rows in tiles of 16: row 1 stops inside the second tile, row 2
  # uses the padded third one, row 0 is empty and must output exactly 0.
  batch, max_length, heads, head_dim = 3, 40, 4, 64
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (batch, heads, head_dim)).astype(dtype)
  k, v = (
    jax.random.normal(key, (batch, max_length, heads, head_dim)).astype(dtype) for key in keys[1:]
  )
  lengths = jnp.array([0, 17, 40])
  got = kernels.decode_attention(q, k, v, lengths, block_k=16)
  with jax.enable_x64(True):
    want = kernels.decode_reference(*(x.astype(jnp.float64) for x in (q, k, v)), lengths)
    want = np.asarray(want)
  assert got.dtype == dtype
  got = np.asarray(got.astype(jnp.float32))
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  assert not got[0].any()


def test_agrees_with_flash_attention_last_row():
  """The decode query at position n-1 sees what causal attention gives it."""
  length, heads, head_dim = 24, 2, 64
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q, k, v = (jax.random.normal(key, (1, length, heads, head_dim)) for key in keys)
  full = kernels.flash_attention(q, k, v, causal=True)
  step = kernels.decode_attention(q[:, -1], k, v, jnp.array([length]))
  np.testing.assert_allclose(step, full[:, -1], atol=1e-5, rtol=1e-5)
