"""Flash attention: padding, backend dispatch and the custom VJP.

The backward pass recomputes attention tile by tile from the saved
log-sum-exp, so neither pass ever holds a [length, length] matrix.
"""

import functools

import jax
import jax.numpy as jnp

from kosmos_jax.kernels import flash_gpu, flash_tpu, tiling

_BACKENDS = {"tpu": flash_tpu, "gpu": flash_gpu}


def flash_attention(
  q,
  k,
  v,
  *,
  causal=True,
  segment_ids=None,
  sm_scale=None,
  interpret=False,
  block_sizes=None,
  backend=None,
):
  """Memory-efficient softmax attention with a Pallas forward and backward.

  A query at i in row b attends key j iff segment_ids[b, i] ==
  segment_ids[b, j] != 0 and (not causal or j <= i). Queries with no allowed
  key (e.g. padding) output 0 and get zero gradients.

  Args:
    q: [batch, length, heads, head_dim] queries.
    k: [batch, length, heads, head_dim] keys.
    v: [batch, length, heads, head_dim] values.
    causal: mask keys after the query.
    segment_ids: [batch, length] ints, 0 = padding; None = one segment.
    sm_scale: logit scale; default head_dim ** -0.5.
    interpret: run the Pallas kernels in interpret mode (always on CPU); for
      the TPU kernels a `pltpu.InterpretParams` selects the interpreter that
      simulates TPU memory (VMEM, DMAs) instead of the generic one.
    block_sizes: tiling.BlockSizes; default is the backend's tuned one. Any
      length works: inputs are padded to block multiples internally.
    backend: "tpu" (Mosaic) or "gpu" (Triton) kernels, taken as given (e.g.
      to compile for a TPU topology ahead of time on a CPU host). None follows
      jax.default_backend(), and on CPU runs the TPU kernels interpreted.

  Returns:
    [batch, length, heads, head_dim] in q.dtype.
  """
  if not q.shape == k.shape == v.shape:
    raise ValueError(f"q, k, v shapes differ: {q.shape} {k.shape} {v.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids {segment_ids.shape} != {q.shape[:2]}")
  backend, interpret = tiling.resolve_backend(backend, interpret)
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  module = _BACKENDS[backend]
  blocks = (block_sizes or module.BLOCK_SIZES).fit(q.shape[1], module.ALIGN)
  length = q.shape[1]
  q, k, v, segment_ids = tiling.pad_inputs(q, k, v, segment_ids, blocks.multiple)
  out = _flash(q, k, v, segment_ids, causal, float(sm_scale), blocks, backend, interpret)
  return out[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, segment_ids, causal, sm_scale, blocks, backend, interpret):
  return _flash_fwd(q, k, v, segment_ids, causal, sm_scale, blocks, backend, interpret)[0]


def _flash_fwd(q, k, v, segment_ids, causal, sm_scale, blocks, backend, interpret):
  out, lse = _BACKENDS[backend].forward(
    q, k, v, segment_ids, causal=causal, sm_scale=sm_scale, block_sizes=blocks, interpret=interpret
  )
  return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(causal, sm_scale, blocks, backend, interpret, residuals, dout):
  q, k, v, segment_ids, out, lse = residuals
  # delta_i = sum_d out_id * dout_id, the softmax-backward row term: a cheap
  # elementwise reduction that XLA fuses, so it stays outside the kernels.
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), dout.astype(jnp.float32))
  dq, dk, dv = _BACKENDS[backend].backward(
    q,
    k,
    v,
    segment_ids,
    lse,
    delta,
    dout,
    causal=causal,
    sm_scale=sm_scale,
    block_sizes=blocks,
    interpret=interpret,
  )
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
