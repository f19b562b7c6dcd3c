"""Next-token score processing with transformers' semantics, traceable under jit.

The n-gram size is static (it sets the loop length); every other knob is a
traced scalar, so changing it does not recompile the decoding loop.
"""

import jax
import jax.numpy as jnp


def no_repeat_ngram(
  scores: jax.Array, tokens: jax.Array, *, cur_len: jax.Array, start: jax.Array, ngram_size: int
) -> jax.Array:
  """transformers' NoRepeatNGramLogitsProcessor: -inf for tokens that would
  complete an n-gram already present in tokens[:, start:cur_len].

  scores [b, vocab]; tokens [b, max_len], the sequence so far in
  [start, cur_len) (the prompt counts, as in transformers). Positions before
  `start` are bucket padding that transformers never saw.
  """
  b, max_len = tokens.shape
  n = ngram_size
  # The last n - 1 tokens; clamped reads when cur_len < n - 1 are masked below.
  prefix = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)
  j = jnp.arange(max_len)
  match = jnp.broadcast_to((j >= start) & (j + n <= cur_len), (b, max_len))
  for k in range(n - 1):
    match = match & (jnp.roll(tokens, -k, axis=1) == prefix[:, k : k + 1])
  follower = jnp.roll(tokens, -(n - 1), axis=1)  # tokens[j + n - 1]; no wrap where match
  banned = jnp.zeros(scores.shape, bool).at[jnp.arange(b)[:, None], follower].max(match)
  return jnp.where(banned, -jnp.inf, scores)


def sampling_filter(
  logits: jax.Array, *, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
  """transformers' temperature, top-k and top-p warpers, in that order.

  top_k = 0 and top_p = 1 disable their filter; removed tokens get -inf.
  """
  logits = logits / temperature
  vocab = logits.shape[-1]
  ascending = jnp.sort(logits, axis=-1)
  kth = jnp.take(ascending, vocab - jnp.clip(top_k, 1, vocab), axis=-1)[..., None]
  logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
  # Top-p: drop the low tail whose total probability is at most 1 - top_p,
  # always keeping the most likely token.
  order = jnp.argsort(logits, axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, -1), -1), -1)
  remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
  rows = jnp.arange(logits.shape[0])[:, None]
  remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
  return jnp.where((top_p < 1.0) & remove, -jnp.inf, logits)


def repetition_penalty(
  scores: jax.Array, tokens: jax.Array, seen: jax.Array, penalty: jax.Array
) -> jax.Array:
  """transformers' RepetitionPenaltyLogitsProcessor: scores of tokens present
  in the row are divided by `penalty` where positive, multiplied where not.

  tokens [b, max_len]; seen [b, max_len]: the positions that count (the row
  so far, prompt included, left padding not, as transformers' mask does).
  """
  b = scores.shape[0]
  present = jnp.zeros(scores.shape, bool).at[jnp.arange(b)[:, None], tokens].max(seen, mode="drop")
  penalized = jnp.where(scores < 0, scores * penalty, scores / penalty)
  return jnp.where(present, penalized, scores).astype(scores.dtype)


def suppress_tokens(scores: jax.Array, ids: jax.Array, active: jax.Array) -> jax.Array:
  """-inf for every token in `ids` where `active` (a scalar or [b]): transformers'
  MinLength / MinNewTokensLength processors with ids the EOS ids."""
  banned = jnp.zeros(scores.shape[-1], bool).at[ids].set(True)
  active = jnp.reshape(active, jnp.shape(active) + (1,) * (scores.ndim - jnp.ndim(active)))
  return jnp.where(banned & active, -jnp.inf, scores)
