"""Flash attention forward and backward as Pallas TPU (Mosaic) kernels.

Inputs arrive as [batch, length, heads, head_dim], already padded to block
multiples (see `flash.py`). The kernels work on [batch, heads, length, head_dim]
so that every tile is a (rows, head_dim) slab whose last two dims satisfy
Mosaic's (8, 128)-or-full-dim rule for any head count.

Grid: (batch, heads, outer blocks, inner blocks); the inner axis is sequential
("arbitrary") and accumulates into VMEM scratch, the rest are parallel. Causal
tiles above the diagonal are skipped, and their index maps repeat the last
useful block so the pipeline issues no DMA for them.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kosmos_jax.kernels import tiling

# Not measured on hardware yet: 128-wide tiles are known to be far too small on
# v5e (jax issue 24633); 512 matches MaxText's splash attention defaults.
BLOCK_SIZES = tiling.BlockSizes(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=512)
# Key tiles are lane-major in the segment-id and score tiles.
ALIGN = 128
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def forward(q, k, v, segment_ids, *, causal, sm_scale, block_sizes, interpret):
  """Attention output [b, l, h, d] and log-sum-exp [b, h, l] (float32)."""
  batch, length, heads, head_dim = q.shape
  bq, bk = block_sizes.block_q, block_sizes.block_k
  q, k, v = (_heads_major(x) for x in (q, k, v))

  def q_map(b, h, i, j):
    del j
    return b, h, i, 0

  def kv_map(b, h, i, j):
    if causal:
      j = jnp.minimum(j, _last_k_block(i, bq, bk))
    return b, h, j, 0

  in_specs = [
    pl.BlockSpec((None, None, bq, head_dim), q_map),
    pl.BlockSpec((None, None, bk, head_dim), kv_map),
    pl.BlockSpec((None, None, bk, head_dim), kv_map),
  ]
  args = [q, k, v]
  if segment_ids is not None:
    in_specs += _segment_specs(bq, bk, q_map, kv_map)
    args += _segment_args(segment_ids)
  out, lse = pl.pallas_call(
    functools.partial(
      _fwd_kernel, causal=causal, sm_scale=sm_scale, has_segments=segment_ids is not None
    ),
    grid=(batch, heads, length // bq, length // bk),
    in_specs=in_specs,
    out_specs=[
      pl.BlockSpec((None, None, bq, head_dim), q_map),
      pl.BlockSpec((None, None, bq, 1), q_map),
    ],
    out_shape=[
      tiling.out_struct(q.shape, q.dtype, q),
      tiling.out_struct((batch, heads, length, 1), jnp.float32, q),
    ],
    scratch_shapes=[
      pltpu.VMEM((bq, 1), jnp.float32),  # running max
      pltpu.VMEM((bq, 1), jnp.float32),  # running denominator
      pltpu.VMEM((bq, head_dim), jnp.float32),  # unnormalized output
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
    interpret=interpret,
    name="flash_fwd",
  )(*args)
  return _heads_major(out), lse[..., 0]


def backward(q, k, v, segment_ids, lse, delta, do, *, causal, sm_scale, block_sizes, interpret):
  """(dq, dk, dv) from two kernels: one per key tile, one per query tile.

  Args:
    q: [b, l, h, d]; k, v, do alike.
    k: keys.
    v: values.
    segment_ids: [b, l] ints or None.
    lse: [b, h, l] float32 log-sum-exp from `forward` (0 for empty rows).
    delta: [b, h, l] float32, rowsum(out * do).
    do: output cotangent.
    causal: mask keys after the query.
    sm_scale: logit scale.
    block_sizes: tiling.BlockSizes.
    interpret: run the kernels in interpret mode (CPU).
  """
  batch, length, heads, head_dim = q.shape
  bq, bk = block_sizes.block_q_bwd, block_sizes.block_k_bwd
  q, k, v, do = (_heads_major(x) for x in (q, k, v, do))
  lse, delta = lse[..., None], delta[..., None]
  has_segments = segment_ids is not None
  seg_args = _segment_args(segment_ids) if has_segments else []
  params = pltpu.CompilerParams(dimension_semantics=_SEMANTICS)

  # dk, dv: grid axis 2 walks key tiles, the sequential axis 3 query tiles.
  def kq_map(b, h, j, i):
    if causal:
      i = jnp.maximum(i, _first_q_block(j, bq, bk))
    return b, h, i, 0

  def kk_map(b, h, j, i):
    del i
    return b, h, j, 0

  q_spec = pl.BlockSpec((None, None, bq, head_dim), kq_map)
  row_spec = pl.BlockSpec((None, None, bq, 1), kq_map)
  k_spec = pl.BlockSpec((None, None, bk, head_dim), kk_map)
  in_specs = [q_spec, k_spec, k_spec, q_spec, row_spec, row_spec]
  if has_segments:
    in_specs += _segment_specs(bq, bk, kq_map, kk_map)
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, causal=causal, sm_scale=sm_scale, has_segments=has_segments),
    grid=(batch, heads, length // bk, length // bq),
    in_specs=in_specs,
    out_specs=[k_spec, k_spec],
    out_shape=[tiling.out_struct(k.shape, k.dtype, k), tiling.out_struct(v.shape, v.dtype, v)],
    scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32)] * 2,
    compiler_params=params,
    interpret=interpret,
    name="flash_bwd_dkv",
  )(q, k, v, do, lse, delta, *seg_args)

  # dq: grid axis 2 walks query tiles, the sequential axis 3 key tiles.
  def qq_map(b, h, i, j):
    del j
    return b, h, i, 0

  def qk_map(b, h, i, j):
    if causal:
      j = jnp.minimum(j, _last_k_block(i, bq, bk))
    return b, h, j, 0

  q_spec = pl.BlockSpec((None, None, bq, head_dim), qq_map)
  row_spec = pl.BlockSpec((None, None, bq, 1), qq_map)
  k_spec = pl.BlockSpec((None, None, bk, head_dim), qk_map)
  in_specs = [q_spec, k_spec, k_spec, q_spec, row_spec, row_spec]
  if has_segments:
    in_specs += _segment_specs(bq, bk, qq_map, qk_map)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, causal=causal, sm_scale=sm_scale, has_segments=has_segments),
    grid=(batch, heads, length // bq, length // bk),
    in_specs=in_specs,
    out_specs=q_spec,
    out_shape=tiling.out_struct(q.shape, q.dtype, q),
    scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
    compiler_params=params,
    interpret=interpret,
    name="flash_bwd_dq",
  )(q, k, v, do, lse, delta, *seg_args)
  return _heads_major(dq), _heads_major(dk), _heads_major(dv)


def _fwd_kernel(*refs, causal, sm_scale, has_segments):
  q_ref, k_ref, v_ref, *refs = refs
  q_ids, kv_ids, refs = _split_segments(refs, has_segments)
  o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, tiling.MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def _step():
    s = _scores(q_ref[...], k_ref[...], sm_scale, i, j, causal, q_ids, kv_ids)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    # Once a row meets its first allowed key, alpha = exp(MASK - m) = 0 wipes
    # whatever the fully masked tiles before it accumulated.
    alpha = jnp.exp(m_prev - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(
      p.astype(v_ref.dtype), v_ref[...], tiling.NN, preferred_element_type=jnp.float32
    )
    acc_ref[...] = alpha * acc_ref[...] + pv
    m_ref[...] = m_new

  _run_if_needed(_step, causal, i * bq + bq - 1 >= j * bk)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    m, l = m_ref[...], l_ref[...]
    # A row whose max never rose above MASK_VALUE had no allowed key.
    empty = m == tiling.MASK_VALUE
    o_ref[...] = jnp.where(empty, 0.0, acc_ref[...] / l).astype(o_ref.dtype)
    # lse = 0 keeps exp(MASK_VALUE - lse) = 0 in the backward pass.
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(l))


def _dkv_kernel(*refs, causal, sm_scale, has_segments):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
  q_ids, kv_ids, refs = _split_segments(refs, has_segments)
  dk_ref, dv_ref, dk_acc, dv_acc = refs
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def _step():
    q, do = q_ref[...], do_ref[...]
    s = _scores(q, k_ref[...], sm_scale, i, j, causal, q_ids, kv_ids)
    p = jnp.exp(s - lse_ref[...])
    dv_acc[...] += lax.dot_general(
      p.astype(do.dtype), do, tiling.TN, preferred_element_type=jnp.float32
    )
    dp = lax.dot_general(do, v_ref[...], tiling.NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dk_acc[...] += lax.dot_general(
      ds.astype(q.dtype), q, tiling.TN, preferred_element_type=jnp.float32
    )

  _run_if_needed(_step, causal, i * bq + bq - 1 >= j * bk)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_acc[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, causal, sm_scale, has_segments):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
  q_ids, kv_ids, refs = _split_segments(refs, has_segments)
  dq_ref, dq_acc = refs
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  def _step():
    k = k_ref[...]
    s = _scores(q_ref[...], k, sm_scale, i, j, causal, q_ids, kv_ids)
    p = jnp.exp(s - lse_ref[...])
    dp = lax.dot_general(do_ref[...], v_ref[...], tiling.NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dq_acc[...] += lax.dot_general(
      ds.astype(k.dtype), k, tiling.NN, preferred_element_type=jnp.float32
    )

  _run_if_needed(_step, causal, i * bq + bq - 1 >= j * bk)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_acc[...] * sm_scale).astype(dq_ref.dtype)


def _scores(q, k, sm_scale, i, j, causal, q_ids, kv_ids):
  """Masked logits of query tile i against key tile j (segment-id refs)."""
  return tiling.masked_scores(
    q,
    k,
    sm_scale,
    i * q.shape[0],
    j * k.shape[0],
    causal=causal,
    q_ids=None if q_ids is None else q_ids[...],
    kv_ids=None if kv_ids is None else kv_ids[...],
  )


def _run_if_needed(step, causal, below_diagonal):
  if causal:
    pl.when(below_diagonal)(step)
  else:
    step()


def _last_k_block(i, bq, bk):
  """Last key tile that query tile i can see under the causal mask."""
  return (i * bq + bq - 1) // bk


def _first_q_block(j, bq, bk):
  """First query tile that can see key tile j under the causal mask."""
  return (j * bk) // bq


def _segment_args(segment_ids):
  # Query ids as a column and key ids as a row: comparing them broadcasts to
  # the tile without any in-kernel transpose.
  segment_ids = segment_ids.astype(jnp.int32)
  return [segment_ids[:, :, None], segment_ids[:, None, :]]


def _segment_specs(bq, bk, q_map, kv_map):
  """BlockSpecs for the segment-id column and row, following q_map/kv_map."""

  def q_ids_map(*idx):
    b, _, i, _ = q_map(*idx)
    return b, i, 0

  def kv_ids_map(*idx):
    b, _, j, _ = kv_map(*idx)
    return b, 0, j

  return [pl.BlockSpec((None, bq, 1), q_ids_map), pl.BlockSpec((None, 1, bk), kv_ids_map)]


def _split_segments(refs, has_segments):
  """(q_ids, kv_ids, rest): the segment-id refs lead `refs` when present."""
  if not has_segments:
    return None, None, refs
  return refs[0], refs[1], refs[2:]


def _heads_major(x):
  return jnp.swapaxes(x, 1, 2)
