"""The one attention entry point: every attention in the model goes through here.

Mask semantics, shared by every implementation: query i of row b may attend key
j iff kv_segment_ids[b, j] != 0, the segment ids of i and j are equal, and (when
causal) j <= i + (kv_len - q_len), i.e. queries are aligned to the end of the
keys. A query with no allowed key returns zeros (never NaN). segment_ids=None
means one segment and no padding.
"""
import jax
import jax.numpy as jnp


def _xla(q, k, v, *, causal, segment_ids, kv_segment_ids, dropout_rate,
         dropout_rng):
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = d ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  mask = None
  if kv_segment_ids is not None:
    q_seg = segment_ids if segment_ids is not None else jnp.ones((b, lq), kv_segment_ids.dtype)
    mask = (q_seg[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    mask = mask[:, None]
  if causal:
    allowed = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq)
    mask = allowed[None, None] if mask is None else mask & allowed[None, None]
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # Rows with no allowed key would otherwise average over masked keys.
    probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
  if dropout_rng is not None and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


_IMPLEMENTATIONS = {"xla": _xla}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
              segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None,
              implementation: str = "xla", dropout_rate: float = 0.0,
              dropout_rng: jax.Array | None = None) -> jax.Array:
  """Multi-head attention. q [b, lq, h, d], k and v [b, lk, h, d] -> [b, lq, h, d].

  Args:
    causal: mask future keys (queries aligned to the end of the keys).
    segment_ids: [b, lq] int, 0 = padding. Defaults to all ones.
    kv_segment_ids: [b, lk] int; defaults to `segment_ids` (self-attention).
    implementation: one of `available_implementations()`.
    dropout_rate, dropout_rng: attention-probability dropout (training only).
  """
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of "
                     f"{sorted(_IMPLEMENTATIONS)}")
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids
  return _IMPLEMENTATIONS[implementation](
      q, k, v, causal=causal, segment_ids=segment_ids,
      kv_segment_ids=kv_segment_ids, dropout_rate=dropout_rate,
      dropout_rng=dropout_rng)


def available_implementations() -> list[str]:
  return sorted(_IMPLEMENTATIONS)
