"""Flash attention kernels (interpret mode) against the float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kosmos_jax import kernels

SMALL = kernels.BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
# Different forward and backward tiles, with block_q != block_k.
MIXED = kernels.BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def packed_segment_ids(rng, batch, length):
  """Contiguous segments, trailing padding, and the last row all padding."""
  rows = []
  for _ in range(batch - 1):
    used = rng.integers(1, length + 1)
    cuts = np.sort(rng.choice(np.arange(1, used), size=min(2, used - 1), replace=False))
    ids = np.zeros(length, np.int32)
    ids[:used] = 1 + np.searchsorted(cuts, np.arange(used), side="right")
    rows.append(ids)
  rows.append(np.zeros(length, np.int32))
  return jnp.asarray(np.stack(rows))


def random_inputs(seed, shape, dtype):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


def outputs_and_grads(attention, q, k, v, dout):
  out, vjp = jax.vjp(attention, q, k, v)
  return (out, *vjp(dout))


def check_against_reference(
  backend, shape, dtype, *, causal, segment_ids, block_sizes, seed=0, interpret=True
):
  q, k, v, dout = random_inputs(seed, shape, dtype)
  got = outputs_and_grads(
    lambda q, k, v: kernels.flash_attention(
      q,
      k,
      v,
      causal=causal,
      segment_ids=segment_ids,
      backend=backend,
      block_sizes=block_sizes,
      interpret=interpret,
    ),
    q,
    k,
    v,
    dout,
  )
  with jax.enable_x64(True):
    wide = [x.astype(jnp.float64) for x in (q, k, v, dout)]
    want = outputs_and_grads(
      lambda q, k, v: kernels.attention_reference(q, k, v, causal=causal, segment_ids=segment_ids),
      *wide,
    )
    want = [np.asarray(x) for x in want]
  tol = TOLERANCE[dtype]
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape and g.dtype == dtype, name
    g = np.asarray(g.astype(jnp.float32))
    assert np.isfinite(g).all(), name
    np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=name)
  return got


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_rows_with_padding(backend, causal):
  # 40 is not a multiple of 16 or 32: the kernels see a padded length of 64.
  shape = (3, 40, 2, 64)
  ids = packed_segment_ids(np.random.default_rng(0), 3, 40)
  out, dq, dk, dv = check_against_reference(
    backend, shape, jnp.float32, causal=causal, segment_ids=ids, block_sizes=MIXED
  )
  # Padding queries output exactly 0; padding positions get exactly zero grads.
  pad = np.asarray(ids == 0)
  for x in (out, dq, dk, dv):
    assert not np.asarray(x)[pad].any()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bfloat16_head_dim_128(backend):
  ids = packed_segment_ids(np.random.default_rng(1), 2, 48)
  check_against_reference(
    backend, (2, 48, 2, 128), jnp.bfloat16, causal=True, segment_ids=ids, block_sizes=SMALL
  )


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_no_segment_ids_unpadded_and_padded(backend):
  # 32 = 2 blocks: the kernels run without any segment masking; 21 needs
  # padding, so segment ids are made internally.
  for length, causal in ((32, True), (21, False)):
    check_against_reference(
      backend, (1, length, 1, 64), jnp.float32, causal=causal, segment_ids=None, block_sizes=SMALL
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_random_shapes(seed):
  rng = np.random.default_rng(seed)
  batch, length, heads = rng.integers(2, 4), rng.integers(1, 70), 2
  head_dim = int(rng.choice([64, 128]))
  ids = packed_segment_ids(rng, batch, length)
  for backend in ("tpu", "gpu"):
    check_against_reference(
      backend,
      (batch, length, heads, head_dim),
      jnp.float32,
      causal=bool(rng.integers(2)),
      segment_ids=ids,
      block_sizes=SMALL,
      seed=seed,
    )


def test_tpu_kernels_under_tpu_memory_simulation():
  """The TPU interpreter models VMEM scratch and skipped-DMA block revisits."""
  ids = packed_segment_ids(np.random.default_rng(4), 2, 40)
  check_against_reference(
    "tpu",
    (2, 40, 1, 64),
    jnp.float32,
    causal=True,
    segment_ids=ids,
    block_sizes=MIXED,
    interpret=pltpu.InterpretParams(),
  )


def test_default_dispatch_under_jit():
  """On CPU the default call runs the TPU kernels interpreted, with the
  default block sizes shrunk to the short input."""
  q, k, v, _ = random_inputs(3, (2, 50, 2, 64), jnp.float32)
  ids = packed_segment_ids(np.random.default_rng(3), 2, 50)
  got = jax.jit(lambda q, k, v: kernels.flash_attention(q, k, v, segment_ids=ids, sm_scale=0.3))(
    q, k, v
  )
  want = kernels.attention_reference(q, k, v, causal=True, segment_ids=ids, sm_scale=0.3)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
