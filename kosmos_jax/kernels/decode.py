"""Decode attention: one new query per row against a KV cache (Pallas TPU).

Decoding reads the whole cache to do ~2 flops per loaded element, so it is
bound by HBM bandwidth, not the MXU. The kernel therefore computes on the VPU
(elementwise products and reductions, all heads of a row at once) and wins by
reading only the valid part of each row: per-row lengths are prefetched into
SMEM and the key-tile index map stops at the row's last valid tile, so the
pipeline issues no DMA for the rest of the cache.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kosmos_jax.kernels import reference, tiling

BLOCK_K = 256  # Cache rows per tile; not yet measured on hardware.


def decode_attention(
  q, k_cache, v_cache, lengths, *, sm_scale=None, interpret=False, block_k=BLOCK_K, backend=None
):
  """Attention of each row's newest query over its first `lengths[b]` keys.

  Args:
    q: [batch, heads, head_dim].
    k_cache: [batch, max_length, heads, head_dim].
    v_cache: [batch, max_length, heads, head_dim].
    lengths: [batch] ints, valid cache entries per row (the new token's key
      included); rows with length 0 output 0.
    sm_scale: logit scale, default head_dim ** -0.5.
    interpret: run the Pallas kernel in interpret mode (always on CPU).
    block_k: cache rows per tile; max_length is padded to a multiple.
    backend: "tpu" runs the Mosaic kernel, "gpu" plain XLA (no GPU decode
      kernel yet); None follows jax.default_backend(), CPU interprets "tpu".

  Returns:
    [batch, heads, head_dim] in q.dtype.
  """
  backend, interpret = tiling.resolve_backend(backend, interpret)
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  if backend == "gpu":
    return reference.decode_reference(q, k_cache, v_cache, lengths, sm_scale=sm_scale)
  batch, max_length, heads, head_dim = k_cache.shape
  block_k = min(block_k, -(-max_length // 8) * 8)
  extra = -max_length % block_k
  if extra:
    widths = ((0, 0), (0, extra), (0, 0), (0, 0))
    k_cache, v_cache = jnp.pad(k_cache, widths), jnp.pad(v_cache, widths)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_length)

  def kv_map(b, j, lengths_ref):
    last = jnp.maximum(pl.cdiv(lengths_ref[b], block_k) - 1, 0)
    return b, jnp.minimum(j, last), 0, 0

  def row_map(b, j, lengths_ref):
    del j, lengths_ref
    return b, 0, 0

  row = pl.BlockSpec((None, heads, head_dim), row_map)
  kv = pl.BlockSpec((None, block_k, heads, head_dim), kv_map)
  return pl.pallas_call(
    functools.partial(_decode_kernel, sm_scale=float(sm_scale)),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(batch, k_cache.shape[1] // block_k),
      in_specs=[row, kv, kv],
      out_specs=row,
      scratch_shapes=[
        pltpu.VMEM((heads, 1), jnp.float32),  # running max
        pltpu.VMEM((heads, 1), jnp.float32),  # running denominator
        pltpu.VMEM((heads, head_dim), jnp.float32),  # unnormalized out
      ],
    ),
    out_shape=tiling.out_struct(q.shape, q.dtype, q),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    interpret=interpret,
    name="decode_attention",
  )(lengths, q, k_cache, v_cache)


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, sm_scale):
  b, j = pl.program_id(0), pl.program_id(1)
  block_k = k_ref.shape[0]
  length = lengths_ref[b]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, tiling.MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(j * block_k < length)
  def _step():
    q = q_ref[...].astype(jnp.float32)[None]  # [1, heads, head_dim]
    k = k_ref[...].astype(jnp.float32)  # [block_k, heads, head_dim]
    # Scores stay [block_k, heads, 1] so heads never move off the sublanes.
    s = jnp.sum(k * q, axis=2, keepdims=True) * sm_scale
    rows = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    s = jnp.where(rows < length, s, tiling.MASK_VALUE)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=0))
    p = jnp.exp(s - m_new[None])
    alpha = jnp.exp(m_prev - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=0)
    pv = jnp.sum(p * v_ref[...].astype(jnp.float32), axis=0)
    acc_ref[...] = alpha * acc_ref[...] + pv
    m_ref[...] = m_new

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    # Rows with length 0 never ran a step: l = 0, output 0.
    l = l_ref[...]
    o_ref[...] = jnp.where(l == 0, 0.0, acc_ref[...] / jnp.where(l == 0, 1.0, l)).astype(
      o_ref.dtype
    )
