"""Batched generation: greedy, sampling and beam search through a KV cache.

The image embeddings are computed once; the prompt is prefilled and then
every new token runs one cached decoder step, all inside one jit
(`lax.while_loop`). Prompts are left padded to a length bucket
(`bucket_length`), and the new-token budget to a capacity bucket, so a new
prompt length or `max_new_tokens` recompiles only when it crosses a bucket.

Outputs equal transformers' `generate` token for token (greedy, beam search,
no_repeat_ngram_size, per-row EOS then padding, output cropped to the last
step any row or beam needed). One deliberate difference: a generated token's
position is the row's previous position + 1 (fairseq, reference/kosmos2.md
1.6), so a left-padded row generates exactly what it generates alone;
transformers 5.x instead counts the left padding into new tokens' positions.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kosmos_jax.models import decoder
from kosmos_jax.search import beam_search, logits_processors

# transformers' GenerationConfig defaults, except top_k: 0 (off) rather than 50.
DEFAULTS = dict(
  num_beams=1,
  do_sample=False,
  temperature=1.0,
  top_k=0,
  top_p=1.0,
  no_repeat_ngram_size=0,
  length_penalty=1.0,
  early_stopping=False,
)
# Traced scalars that are integers; the others are float32.
_INT_SCALARS = ("max_new_tokens", "top_k", "start")


def bucket_length(n: int) -> int:
  """Powers of two from 16 to 64, then multiples of 64."""
  if n <= 64:
    return max(16, 1 << (n - 1).bit_length())
  return -(-n // 64) * 64


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the compiled loop depends on; everything else is a traced argument."""

  capacity: int  # new-token slots (bucketed max_new_tokens)
  num_beams: int
  do_sample: bool
  ngram_size: int
  early_stopping: bool | str
  eos_ids: tuple[int, ...]
  pad_id: int


def _options(model, **explicit) -> tuple[_Static, dict]:
  """Explicit arguments, else the checkpoint's generation config, else DEFAULTS.

  Returns the static options and the traced scalars (as Python numbers).
  """
  generation_config = getattr(model, "generation_config", None) or {}
  opts = {}
  for key, value in explicit.items():
    if value is None:
      value = generation_config.get(key)
    opts[key] = DEFAULTS.get(key) if value is None else value
  if not opts["max_new_tokens"] or opts["max_new_tokens"] < 1:
    raise ValueError("max_new_tokens must be a positive integer (argument or generation config)")
  if opts["num_beams"] > 1 and opts["do_sample"]:
    raise ValueError("sampling with num_beams > 1 (beam sampling) is not supported")
  text_cfg = model.config.text
  eos = text_cfg.eos_id if opts["eos_token_id"] is None else opts["eos_token_id"]
  static = _Static(
    capacity=bucket_length(opts["max_new_tokens"]),
    num_beams=int(opts["num_beams"]),
    do_sample=bool(opts["do_sample"]),
    ngram_size=int(opts["no_repeat_ngram_size"] or 0),
    early_stopping=opts["early_stopping"],
    eos_ids=tuple(int(e) for e in (eos if isinstance(eos, Sequence) else [eos])),
    pad_id=text_cfg.pad_id if opts["pad_token_id"] is None else int(opts["pad_token_id"]),
  )
  scalars = {
    k: opts[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "length_penalty")
  }
  return static, scalars


def generate(
  model,
  input_ids: Any,
  pixel_values: Any = None,
  attention_mask: Any = None,
  image_embeds_position_mask: Any = None,
  *,
  max_new_tokens: int | None = None,
  num_beams: int | None = None,
  do_sample: bool | None = None,
  temperature: float | None = None,
  top_k: int | None = None,
  top_p: float | None = None,
  no_repeat_ngram_size: int | None = None,
  length_penalty: float | None = None,
  early_stopping: bool | str | None = None,
  seed: int = 0,
  eos_token_id: int | Sequence[int] | None = None,
  pad_token_id: int | None = None,
) -> np.ndarray:
  """Generates continuations of left-padded prompts; see `Kosmos2.generate`."""
  static, scalars = _options(
    model,
    max_new_tokens=max_new_tokens,
    num_beams=num_beams,
    do_sample=do_sample,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    no_repeat_ngram_size=no_repeat_ngram_size,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
    eos_token_id=eos_token_id,
    pad_token_id=pad_token_id,
  )
  ids = np.asarray(input_ids, np.int64)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
  if pixel_values is not None and image_embeds_position_mask is None:
    raise ValueError("image_embeds_position_mask is required with pixel_values")
  if attention_mask is None:  # As transformers: pads are masked unless pad is an EOS id.
    attention_mask = ids != static.pad_id if static.pad_id not in static.eos_ids else ids >= 0
  slots = (
    np.zeros_like(ids)
    if image_embeds_position_mask is None
    else np.asarray(image_embeds_position_mask)
  )
  length = ids.shape[1]
  prompt = bucket_length(length)
  extra = [(0, 0), (prompt - length, 0)]
  # Bucket padding uses the model's pad id, so it gets the zero position row.
  padded = dict(
    ids=np.pad(ids, extra, constant_values=model.config.text.pad_id),
    mask=np.pad(np.asarray(attention_mask), extra),
    slots=np.pad(slots, extra),
  )
  scalars["start"] = prompt - length
  scalars = {
    k: jnp.asarray(v, jnp.int32 if k in _INT_SCALARS else jnp.float32) for k, v in scalars.items()
  }
  graphdef, state = nnx.split(model)
  image_embeds = (
    None if pixel_values is None else _encode(graphdef, state, jnp.asarray(pixel_values))
  )
  tokens, steps = _generate_jit(
    graphdef,
    static,
    state,
    {k: jnp.asarray(v, jnp.int32) for k, v in padded.items()},
    image_embeds,
    scalars,
    jax.random.key(seed),
  )
  new = np.asarray(tokens)[:, prompt : prompt + int(steps)]
  return np.concatenate([ids, new.astype(np.int64)], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, pixel_values):
  return nnx.merge(graphdef, state).encode_images(pixel_values)


def _prefill(text, static: _Static, inputs, image_embeds):
  """Prefills the bucketed prompt. Returns its last logits, the cache, and
  `step(cache, token, generated, rows) -> (logits, cache)`, which runs new
  token number `generated` (1-based) of batch rows `rows` through the cache."""
  cfg = text.cfg
  ids = inputs["ids"]
  batch, prompt = ids.shape
  hidden = text.embed(
    ids,
    image_embeds=image_embeds,
    image_embeds_position_mask=None if image_embeds is None else inputs["slots"],
  )
  cache = text.init_cache(batch, prompt + static.capacity)
  logits, cache = text.decode(hidden, cache, segment_ids=inputs["mask"])
  # fairseq positions: each new token one past the row's last position.
  last_position = decoder.positions_from_ids(ids, cfg.pad_id).max(axis=1)

  def step(cache, token, generated, rows):
    position = jnp.where(token == cfg.pad_id, cfg.pad_id, last_position[rows] + generated)
    hidden = text.embed(token[:, None], position_ids=position[:, None])
    return text.decode(hidden, cache, segment_ids=jnp.ones_like(token)[:, None])

  return logits, cache, step


def _generate_impl(graphdef, static: _Static, state, inputs, image_embeds, scalars, key):
  text = nnx.merge(graphdef, state).text_model
  logits, cache, step = _prefill(text, static, inputs, image_embeds)
  batch, prompt = inputs["ids"].shape
  tokens = jnp.full((batch, prompt + static.capacity), static.pad_id, jnp.int32)
  tokens = tokens.at[:, :prompt].set(inputs["ids"])

  def process(scores, tokens, cur_len):
    if static.ngram_size:
      scores = logits_processors.no_repeat_ngram(
        scores, tokens, cur_len=cur_len, start=scalars["start"], ngram_size=static.ngram_size
      )
    return scores

  if static.num_beams > 1:
    return beam_search.beam_search(
      step,
      logits,
      cache,
      tokens,
      prompt_len=prompt,
      max_new=scalars["max_new_tokens"],
      num_beams=static.num_beams,
      eos_ids=static.eos_ids,
      length_penalty=scalars["length_penalty"],
      early_stopping=static.early_stopping,
      process=process,
      reorder=decoder.select_cache_rows,
    )
  return _greedy_or_sample(step, logits, cache, tokens, static, scalars, key, process)


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 1))


def _greedy_or_sample(step, logits, cache, tokens, static: _Static, scalars, key, process):
  """transformers' `_sample`: finished rows emit pad; stops when all rows hit EOS."""
  batch = tokens.shape[0]
  prompt = tokens.shape[1] - static.capacity
  rows = jnp.arange(batch)
  eos = jnp.asarray(static.eos_ids, jnp.int32)

  def choose(logits, tokens, generated, finished):
    scores = process(logits, tokens, prompt + generated)
    if static.do_sample:
      scores = logits_processors.sampling_filter(
        scores, temperature=scalars["temperature"], top_k=scalars["top_k"], top_p=scalars["top_p"]
      )
      token = jax.random.categorical(jax.random.fold_in(key, generated), scores, axis=-1)
    else:
      token = jnp.argmax(scores, axis=-1)
    token = jnp.where(finished, static.pad_id, token.astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, prompt + generated))
    return tokens, finished | jnp.isin(token, eos)

  tokens, finished = choose(logits, tokens, 0, jnp.zeros((batch,), bool))

  def cond(carry):
    _, _, generated, finished = carry
    return (generated < scalars["max_new_tokens"]) & ~finished.all()

  def body(carry):
    tokens, cache, generated, finished = carry
    last = jax.lax.dynamic_index_in_dim(tokens, prompt + generated - 1, axis=1, keepdims=False)
    logits, cache = step(cache, last, generated, rows)
    tokens, finished = choose(logits, tokens, generated, finished)
    return tokens, cache, generated + 1, finished

  tokens, _, generated, _ = jax.lax.while_loop(cond, body, (tokens, cache, jnp.int32(1), finished))
  return tokens, generated
