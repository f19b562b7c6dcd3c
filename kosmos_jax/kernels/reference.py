"""Pure-jnp attention with the exact mask semantics every kernel must match.

A query at position i in row b may attend key j iff
  segment_ids[b, i] == segment_ids[b, j], segment_ids[b, j] != 0,
  and (not causal or j <= i).
A query with no allowed key outputs exactly 0 and gets zero gradient.
"""

import jax
import jax.numpy as jnp


def attention_mask(q_len, kv_len, *, causal, segment_ids=None):
  """Boolean mask [batch or 1, 1, q_len, kv_len] (the heads axis is 1).

  Args:
    q_len: query length.
    kv_len: key length.
    causal: whether key j must satisfy j <= i.
    segment_ids: [batch, length] int ids (0 = padding), q_len == kv_len, or
      None (everything one segment, no padding).
  """
  mask = jnp.ones((1, 1, q_len, kv_len), bool)
  if causal:
    mask &= jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = mask & (same & (segment_ids[:, None, :] != 0))[:, None]
  return mask


def attention_reference(q, k, v, *, causal=True, segment_ids=None, sm_scale=None):
  """Softmax attention computed in float32 or wider (float64 under x64).

  Args:
    q: [batch, length, heads, head_dim].
    k: [batch, length, heads, head_dim].
    v: [batch, length, heads, head_dim].
    causal: mask keys after the query.
    segment_ids: [batch, length] ints, 0 = padding; None = one segment.
    sm_scale: logit scale, default head_dim ** -0.5.

  Returns:
    [batch, length, heads, head_dim] in q.dtype.
  """
  mask = attention_mask(q.shape[1], k.shape[1], causal=causal, segment_ids=segment_ids)
  return _masked_attention(q, k, v, mask, sm_scale)


def _masked_attention(q, k, v, mask, sm_scale):
  """Softmax attention under a boolean [b, h, q, k] (broadcastable) mask."""
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype))
  logits = jnp.where(mask, logits * sm_scale, -jnp.inf)
  # Rows without any allowed key would be all -inf: give them a finite max so
  # exp() yields zeros (not NaN), and a unit denominator so the output is 0.
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
  weights = jnp.exp(logits - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  weights /= jnp.where(denom == 0, 1, denom)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(dtype))
  return out.astype(q.dtype)
