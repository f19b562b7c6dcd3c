"""Flash attention forward and backward as Pallas GPU (Triton) kernels.

Works directly on [batch, length, heads, head_dim] (Triton has no tiling rule
on the last two dims). One program owns one (tile, batch, head): it keeps its
own tile in registers and loops over the other sequence's tiles with
`fori_loop`, reading them from the whole-sequence block in global memory.
Causal loops stop at (or start from) the diagonal.

jax 0.10 marks the Triton backend deprecated in favour of Mosaic GPU; Mosaic
GPU needs Hopper, Triton runs on any recent NVIDIA GPU, hence Triton here.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kosmos_jax.kernels import tiling

# FlashAttention-2's Triton settings for A100/H100-class GPUs; not yet measured
# on our shapes (benchmarks/attention.py does that).
BLOCK_SIZES = tiling.BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
# tl.dot needs at least 16 rows and columns.
ALIGN = 16
_NUM_STAGES = 2


def forward(q, k, v, segment_ids, *, causal, sm_scale, block_sizes, interpret):
  """Attention output [b, l, h, d] and log-sum-exp [b, h, l] (float32)."""
  batch, length, heads, head_dim = q.shape
  bq, bk = block_sizes.block_q, block_sizes.block_k
  tile = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  whole = pl.BlockSpec((None, length, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  in_specs = [tile, whole, whole]
  args = [q, k, v]
  if segment_ids is not None:
    in_specs.append(pl.BlockSpec((None, length), lambda i, b, h: (b, 0)))
    args.append(segment_ids.astype(jnp.int32))
  return pl.pallas_call(
    functools.partial(
      _fwd_kernel,
      causal=causal,
      sm_scale=sm_scale,
      block_k=bk,
      has_segments=segment_ids is not None,
    ),
    grid=(length // bq, batch, heads),
    in_specs=in_specs,
    out_specs=[tile, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
    out_shape=[
      tiling.out_struct(q.shape, q.dtype, q),
      tiling.out_struct((batch, heads, length), jnp.float32, q),
    ],
    compiler_params=_params(head_dim, bq, bk),
    interpret=interpret,
    name="flash_fwd",
  )(*args)


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
  has_segments = segment_ids is not None
  whole = pl.BlockSpec((None, length, None, head_dim), lambda t, b, h: (b, 0, h, 0))
  whole_row = pl.BlockSpec((None, None, length), lambda t, b, h: (b, h, 0))
  in_specs = [whole, whole, whole, whole, whole_row, whole_row]
  args = [q, k, v, do, lse, delta]
  if has_segments:
    in_specs.append(pl.BlockSpec((None, length), lambda t, b, h: (b, 0)))
    args.append(segment_ids.astype(jnp.int32))
  kernel_args = dict(
    causal=causal, sm_scale=sm_scale, block_q=bq, block_k=bk, has_segments=has_segments
  )

  def tile_spec(rows):
    return pl.BlockSpec((None, rows, None, head_dim), lambda t, b, h: (b, t, h, 0))

  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, **kernel_args),
    grid=(length // bk, batch, heads),
    in_specs=in_specs,
    out_specs=[tile_spec(bk), tile_spec(bk)],
    out_shape=[tiling.out_struct(k.shape, k.dtype, k), tiling.out_struct(v.shape, v.dtype, v)],
    compiler_params=_params(head_dim, bq, bk),
    interpret=interpret,
    name="flash_bwd_dkv",
  )(*args)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, **kernel_args),
    grid=(length // bq, batch, heads),
    in_specs=in_specs,
    out_specs=tile_spec(bq),
    out_shape=tiling.out_struct(q.shape, q.dtype, q),
    compiler_params=_params(head_dim, bq, bk),
    interpret=interpret,
    name="flash_bwd_dq",
  )(*args)
  return dq, dk, dv


def _fwd_kernel(*refs, causal, sm_scale, block_k, has_segments):
  if has_segments:
    q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, lse_ref), seg_ref = refs, None
  bq, head_dim = q_ref.shape
  i = pl.program_id(0)
  q_start = i * bq
  q = q_ref[...]
  q_ids = None if seg_ref is None else seg_ref[pl.ds(q_start, bq)][:, None]

  def body(j, carry):
    acc, m_prev, l_prev = carry
    keys = pl.ds(j * block_k, block_k)
    kv_ids = None if seg_ref is None else seg_ref[keys][None, :]
    s = tiling.masked_scores(
      q, k_ref[keys, :], sm_scale, q_start, j * block_k, causal=causal, q_ids=q_ids, kv_ids=kv_ids
    )
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    # Once a row meets its first allowed key, alpha = exp(MASK - m) = 0 wipes
    # whatever the fully masked tiles before it accumulated.
    alpha = jnp.exp(m_prev - m_new)
    pv = lax.dot_general(
      p.astype(v_ref.dtype), v_ref[keys, :], tiling.NN, preferred_element_type=jnp.float32
    )
    return (alpha[:, None] * acc + pv, m_new, alpha * l_prev + jnp.sum(p, axis=1))

  num_k = k_ref.shape[0] // block_k
  if causal:
    num_k = (q_start + bq - 1) // block_k + 1
  acc, m, l = lax.fori_loop(
    0,
    num_k,
    body,
    (
      jnp.zeros((bq, head_dim), jnp.float32),
      jnp.full((bq,), tiling.MASK_VALUE, jnp.float32),
      jnp.zeros((bq,), jnp.float32),
    ),
  )
  # A row whose max never rose above MASK_VALUE had no allowed key; lse = 0
  # keeps exp(MASK_VALUE - lse) = 0 for it in the backward pass.
  empty = m == tiling.MASK_VALUE
  o_ref[...] = jnp.where(empty[:, None], 0.0, acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(l))


def _dkv_kernel(*refs, causal, sm_scale, block_q, block_k, has_segments):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
  seg_ref, (dk_ref, dv_ref) = _split_segments(refs, has_segments)
  head_dim = q_ref.shape[-1]
  k_start = pl.program_id(0) * block_k
  keys = pl.ds(k_start, block_k)
  k, v = k_ref[keys, :], v_ref[keys, :]
  kv_ids = None if seg_ref is None else seg_ref[keys][None, :]

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    q_ids = None if seg_ref is None else seg_ref[rows][:, None]
    s = tiling.masked_scores(
      q, k, sm_scale, i * block_q, k_start, causal=causal, q_ids=q_ids, kv_ids=kv_ids
    )
    p = jnp.exp(s - lse_ref[rows][:, None])
    dv += lax.dot_general(p.astype(do.dtype), do, tiling.TN, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v, tiling.NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[rows][:, None])
    dk += lax.dot_general(ds.astype(q.dtype), q, tiling.TN, preferred_element_type=jnp.float32)
    return dk, dv

  first_q = k_start // block_q if causal else 0
  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(first_q, q_ref.shape[0] // block_q, body, (zeros, zeros))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, causal, sm_scale, block_q, block_k, has_segments):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
  seg_ref, (dq_ref,) = _split_segments(refs, has_segments)
  head_dim = q_ref.shape[-1]
  q_start = pl.program_id(0) * block_q
  rows = pl.ds(q_start, block_q)
  q, do = q_ref[rows, :], do_ref[rows, :]
  lse, delta = lse_ref[rows][:, None], delta_ref[rows][:, None]
  q_ids = None if seg_ref is None else seg_ref[rows][:, None]

  def body(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    kv_ids = None if seg_ref is None else seg_ref[keys][None, :]
    s = tiling.masked_scores(
      q, k, sm_scale, q_start, j * block_k, causal=causal, q_ids=q_ids, kv_ids=kv_ids
    )
    p = jnp.exp(s - lse)
    dp = lax.dot_general(do, v_ref[keys, :], tiling.NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    return dq + lax.dot_general(
      ds.astype(k.dtype), k, tiling.NN, preferred_element_type=jnp.float32
    )

  num_k = k_ref.shape[0] // block_k
  if causal:
    num_k = (q_start + block_q - 1) // block_k + 1
  dq = lax.fori_loop(0, num_k, body, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _split_segments(refs, has_segments):
  """(segment-id ref or None, remaining refs)."""
  if has_segments:
    return refs[0], refs[1:]
  return None, refs


def _params(head_dim, block_q, block_k):
  # More warps pay off once a tile holds enough work for them.
  num_warps = 8 if head_dim > 64 and block_q * block_k >= 128 * 64 else 4
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=_NUM_STAGES)
