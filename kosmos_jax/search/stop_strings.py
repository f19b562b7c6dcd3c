"""Stop strings with transformers' `StopStringCriteria` semantics, traceable under jit.

A row stops once its text (the concatenated token texts, prompt included)
contains a stop string that overlaps the last token: "stop" ends
["st", "op"], ["st", "opera"] and ["las", "topper"], not ["stop", "at"].
The check needs no strings at run time: the host precomputes, per stop
string and token, where in the string the token's text can sit, and the loop
walks back over the last tokens accumulating matched characters.

For a stop string s of length L and a token text t:
- end overlaps: the characters of s's end that t starts with (s's end falls
  inside t); the walk starts there.
- positions: the counts i in 1..L-1 of characters already matched (from the
  end) such that t can come right before them (t may run off s's start).
A walk matches when its count reaches L before a token fails to fit.

Token texts are the vocabulary's pieces with "▁" read as a space, which is
what transformers' cleaned vocabulary gives for Kosmos-2's tokenizer. Limits:
the match is on token texts (exact for text that decodes piece by piece, as
sentencepiece's does), and the walk looks back `window` tokens: the longest
string's length rounded up to a power of two, where transformers looks back
exactly that length; the two differ only for vocabularies with empty tokens.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Padding string slots never start a walk; their target is out of reach.
_UNREACHABLE = 1 << 30


def _pow2(n: int, floor: int = 1) -> int:
  return max(floor, 1 << max(n - 1, 0).bit_length())


def _fits(stop: str, text: str) -> tuple[set[int], set[int]]:
  """(end overlaps, positions) of token `text` in `stop` (module doc)."""
  size = len(stop)
  ends = set()
  for e in range(1, len(text) + 1):  # s's end right after text[:e]
    head = text[:e]
    if (e <= size and stop.endswith(head)) or (e > size and head.endswith(stop)):
      ends.add(min(e, size))
  positions = set()
  for i in range(1, size):  # text ends where i characters remain to its right
    rest = stop[: size - i]
    if rest.endswith(text) if len(text) <= len(rest) else text.endswith(rest):
      positions.add(i)
  return ends, positions


def _bits(values: set[int], words: int) -> list[int]:
  """A set of small integers as `words` 32-bit masks."""
  masks = [0] * words
  for v in values:
    masks[v // 32] |= 1 << (v % 32)
  return masks


@functools.lru_cache(maxsize=8)
def _table(texts: tuple[str, ...], stops: tuple[str, ...], vocab_size: int):
  # Shapes depend on the vocabulary, the number of strings and the window
  # only, each padded to a power of two: other strings reuse the loop.
  window = _pow2(max(map(len, stops)), 8)
  words = -(-(window + 1) // 32)
  num_strings = _pow2(len(stops))
  # Row vocab_size is every other token: it fits nowhere, so it ends a walk.
  ends = np.zeros((num_strings, vocab_size + 1, words), np.uint32)
  positions = np.zeros_like(ends)
  lengths = np.zeros(vocab_size + 1, np.int32)
  chars = [frozenset(stop) for stop in stops]
  for token, text in enumerate(texts[:vocab_size]):
    lengths[token] = len(text)
    for k, stop in enumerate(stops):
      # Only a token sharing a character with the string can fit in it (an
      # empty one fits at every inner position, as in transformers).
      if not text or not chars[k].isdisjoint(text):
        e, p = _fits(stop, text)
        ends[k, token] = _bits(e, words)
        positions[k, token] = _bits(p, words)
  for k, stop in enumerate(stops):
    if not ends[k].any():
      raise ValueError(f"stop string {stop!r}: no token of the vocabulary can end it")
  targets = np.full(num_strings, _UNREACHABLE, np.int32)
  targets[: len(stops)] = [len(s) for s in stops]
  return dict(ends=ends, positions=positions, lengths=lengths, targets=targets), window


def build(texts: Sequence[str], stop_strings: Sequence[str], vocab_size: int):
  """Host tables for `matches`: (dict of arrays, window: tokens looked back).

  texts: token id -> text (ids past it, or past `vocab_size`, fit nowhere).
  """
  stops = tuple(stop_strings)
  if not stops or not all(isinstance(s, str) and s for s in stops):
    raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
  return _table(tuple(texts), stops, int(vocab_size))


def _has(masks: jax.Array, value: jax.Array) -> jax.Array:
  """Whether `value` is in the sets `masks` [..., words] (values broadcast)."""
  words = masks.shape[-1]
  shape = jnp.broadcast_shapes(masks.shape[:-1], value.shape)
  masks = jnp.broadcast_to(masks, (*shape, words))
  value = jnp.broadcast_to(value, shape)
  inside = (value >= 0) & (value < 32 * words)
  value = jnp.clip(value, 0, 32 * words - 1)
  word = jnp.take_along_axis(masks, (value // 32)[..., None], axis=-1)[..., 0]
  return inside & (((word >> (value % 32).astype(jnp.uint32)) & 1) == 1)


def matches(
  table: dict, tokens: jax.Array, length: jax.Array, valid: jax.Array, window: int
) -> jax.Array:
  """Whether tokens[:, :length] ends a stop string (bool [rows]).

  valid [rows, max_len]: False where a token is not part of the text (left
  padding); such a token, like one before the start, ends a walk.
  """
  back = length - 1 - jnp.arange(window)  # the last token first
  inside = back >= 0
  back = jnp.maximum(back, 0)
  ids = jnp.take(tokens, back, axis=1)
  vocab = table["lengths"].shape[0] - 1
  ok = inside[None, :] & jnp.take(valid, back, axis=1) & (ids >= 0) & (ids < vocab)
  ids = jnp.where(ok, ids, vocab)  # [n, window]
  # Walks start at every end overlap e = 1 .. window of the last token;
  # characters matched after each token: [strings, n, e, window].
  overlap = jnp.arange(1, window + 1)
  start = _has(table["ends"][:, ids[:, 0], None, :], overlap[None, None, :])
  lengths = table["lengths"][ids[:, 1:]]
  walked = jnp.concatenate([jnp.zeros_like(lengths[:, :1]), jnp.cumsum(lengths, axis=1)], 1)
  counts = overlap[None, None, :, None] + walked[None, :, None, :]
  # Token k + 1 of the walk fits right before the count after token k.
  before = table["positions"][:, ids[:, 1:]]  # [strings, n, window - 1, words]
  fits = _has(before[:, :, None], counts[..., :-1])
  alive = jnp.cumprod(jnp.concatenate([start[..., None], fits], axis=-1), axis=-1).astype(bool)
  reached = alive & (counts >= table["targets"][:, None, None, None])
  return reached.any(axis=(0, 2, 3))
