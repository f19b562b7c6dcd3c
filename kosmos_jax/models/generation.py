"""Batched generation: greedy, sampling and beam search through a KV cache.

The image embeddings (and other modalities' soft tokens) are computed once;
the prompt is prefilled and then every new token runs one cached decoder
step, all inside one jit (`lax.while_loop`). Prompts are left padded to a
length bucket (`bucket_length`), and the new-token budget to a capacity
bucket, so a new prompt length or `max_new_tokens` recompiles only when it
crosses a bucket.

Outputs equal transformers' `generate` token for token (greedy, beam search,
no_repeat_ngram_size, repetition_penalty, min_length / min_new_tokens, one or
several EOS ids, stop_strings, num_return_sequences, per-row EOS then
padding, output cropped to the last step any row or beam needed). Option
values are traced, so new EOS ids, penalties, minimums or stop strings reuse
the compiled loop; static are num_beams, do_sample, num_return_sequences,
the number of EOS ids, and whether there are stop strings (their number and
longest length in power-of-two buckets: search/stop_strings.py).

One deliberate difference: a generated token's position is the row's
previous position + 1 (fairseq, reference/kosmos2.md 1.6), so a left-padded
row generates exactly what it generates alone; transformers 5.x instead
counts the left padding into new tokens' positions.
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
from kosmos_jax.search import beam_search, logits_processors, options
from kosmos_jax.search import stop_strings as stop_lib  # `stop_strings` is an argument
from kosmos_jax.search.options import bucket_length  # scoring and eval bucket alike


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
  min_length: int | None = None,
  min_new_tokens: int | None = None,
  repetition_penalty: float | None = None,
  stop_strings: str | Sequence[str] | None = None,
  tokenizer: Any = None,
  num_return_sequences: int | None = None,
  modality_embeds: Any = None,
  modality_types: Any = None,
) -> np.ndarray:
  """Generates continuations of left-padded prompts; see `Kosmos2.generate`.

  As transformers: min_length counts the whole row (prompt width included),
  min_new_tokens new tokens only and wins when both are set; both keep every
  EOS id out until reached. repetition_penalty divides positive and
  multiplies negative scores of tokens already in the row (prompt included,
  left padding not). stop_strings end a row once its text ends one (it needs
  `tokenizer`: our Processor or vocabulary). num_return_sequences: rows
  [i * n, (i + 1) * n) belong to input row i (samples, or the best beams
  first).
  """
  ids = np.asarray(input_ids, np.int64)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
  text_cfg = model.config.text
  static, scalars, stops = options.resolve(
    getattr(model, "generation_config", None) or {},
    text_cfg.eos_id,
    text_cfg.pad_id,
    ids.shape[1],
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
    min_length=min_length,
    min_new_tokens=min_new_tokens,
    repetition_penalty=repetition_penalty,
    stop_strings=stop_strings,
    num_return_sequences=num_return_sequences,
  )
  check_slot_inputs(pixel_values, image_embeds_position_mask, modality_embeds)
  if attention_mask is None:  # As transformers: pads are masked unless pad is an EOS id.
    pad_is_eos = static.pad_id in scalars["eos_ids"]
    attention_mask = ids != static.pad_id if not pad_is_eos else ids >= 0
  slots = (
    np.zeros_like(ids)
    if image_embeds_position_mask is None
    else np.asarray(image_embeds_position_mask)
  )
  length = ids.shape[1]
  prompt = bucket_length(length)
  extra = [(0, 0), (prompt - length, 0)]
  # Sampling draws num_return_sequences rows per prompt (transformers' expansion).
  repeats = static.num_return if static.do_sample else 1
  # Bucket padding uses the model's pad id, so it gets the zero position row.
  padded = dict(
    ids=np.pad(ids, extra, constant_values=text_cfg.pad_id),
    mask=np.pad(np.asarray(attention_mask), extra),
    slots=np.pad(slots, extra),
  )
  padded = {k: np.repeat(v, repeats, axis=0) for k, v in padded.items()}
  scalars["start"] = prompt - length
  scalars = {
    k: jnp.asarray(v, jnp.int32 if k in options.INT_SCALARS else jnp.float32)
    for k, v in scalars.items()
  }
  table = None
  if stops:
    if tokenizer is None:
      raise ValueError("stop_strings needs tokenizer= (the Processor) to read token texts")
    texts = options.token_texts(tokenizer)
    table, window = stop_lib.build(texts, stops, text_cfg.vocab_size)
    static = dataclasses.replace(static, stop_window=window)
  graphdef, state = nnx.split(model)
  image_embeds = (
    None if pixel_values is None else _encode(graphdef, state, jnp.asarray(pixel_values))
  )
  soft_tokens = (
    None
    if modality_embeds is None
    else _encode_modalities(graphdef, state, jnp.asarray(modality_embeds), modality_types)
  )
  if repeats > 1:
    repeat = lambda x: None if x is None else jnp.repeat(x, repeats, axis=0)
    image_embeds, soft_tokens = repeat(image_embeds), repeat(soft_tokens)
  tokens, steps = _generate_jit(
    graphdef,
    static,
    state,
    {k: jnp.asarray(v, jnp.int32) for k, v in padded.items()},
    (image_embeds, soft_tokens),
    scalars,
    None if table is None else {k: jnp.asarray(v) for k, v in table.items()},
    jax.random.key(seed),
  )
  new = np.asarray(tokens)[:, prompt : prompt + int(steps)]
  return np.concatenate([np.repeat(ids, static.num_return, 0), new.astype(np.int64)], axis=1)


def check_slot_inputs(pixel_values, slot_mask, modality_embeds) -> None:
  """Errors for inputs whose slots are not marked, or marked slots without
  their inputs (their placeholder ids would run as text)."""
  if pixel_values is not None and slot_mask is None:
    raise ValueError("image_embeds_position_mask is required with pixel_values")
  if modality_embeds is not None and slot_mask is None:
    raise ValueError(
      "image_embeds_position_mask (2 on modality slots) is required with modality_embeds"
    )
  if modality_embeds is None and slot_mask is not None:
    if (np.asarray(slot_mask) == decoder.MODALITY_SLOT).any():
      raise ValueError("image_embeds_position_mask has modality slots (2) but no modality_embeds")


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, pixel_values):
  return nnx.merge(graphdef, state).encode_images(pixel_values)


@functools.partial(jax.jit, static_argnums=0)
def _encode_modalities(graphdef, state, modality_embeds, modality_types):
  return nnx.merge(graphdef, state).encode_modalities(modality_embeds, modality_types)


def _prefill(text, static: options.Static, inputs, embeds):
  """Prefills the bucketed prompt. Returns its last logits, the cache, and
  `step(cache, token, generated, rows) -> (logits, cache)`, which runs new
  token number `generated` (1-based) of batch rows `rows` through the cache."""
  cfg = text.cfg
  ids = inputs["ids"]
  batch, prompt = ids.shape
  image_embeds, soft_tokens = embeds  # either may be None
  hidden = text.embed(
    ids,
    image_embeds=image_embeds,
    image_embeds_position_mask=inputs["slots"],
    modality_tokens=soft_tokens,
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


def _generate_impl(graphdef, static: options.Static, state, inputs, embeds, scalars, table, key):
  """`embeds`: (image embeddings, modality soft tokens), either None."""
  text = nnx.merge(graphdef, state).text_model
  logits, cache, step = _prefill(text, static, inputs, embeds)
  batch, prompt = inputs["ids"].shape
  total = prompt + static.capacity
  tokens = jnp.full((batch, total), static.pad_id, jnp.int32)
  tokens = tokens.at[:, :prompt].set(inputs["ids"])
  # Positions that are part of a row's text: not left or bucket padding.
  in_text = jnp.concatenate([inputs["mask"] != 0, jnp.ones((batch, static.capacity), bool)], 1)
  # Beam search passes beams x rows; beams of item i are consecutive rows.
  per_row = lambda x, rows: jnp.repeat(x, rows // batch, axis=0)

  def process(scores, tokens, cur_len):
    """transformers' processors, in its order."""
    penalty = scalars["repetition_penalty"]

    def penalize(scores):  # a branch: at the default 1.0 the loop pays nothing
      seen = per_row(in_text, tokens.shape[0]) & (jnp.arange(total) < cur_len)
      return logits_processors.repetition_penalty(scores, tokens, seen, penalty)

    scores = jax.lax.cond(penalty != 1.0, penalize, lambda s: s, scores)
    if static.ngram_size:
      scores = logits_processors.no_repeat_ngram(
        scores, tokens, cur_len=cur_len, start=scalars["start"], ngram_size=static.ngram_size
      )
    short = cur_len - prompt < scalars["min_new_tokens"]
    return logits_processors.suppress_tokens(scores, scalars["eos_ids"], short)

  def stopped(sequences, length):
    """Rows whose text now ends a stop string (all False without any)."""
    if not static.stop_window:
      return jnp.zeros(sequences.shape[:1], bool)
    valid = per_row(in_text, sequences.shape[0])
    return stop_lib.matches(table, sequences, length, valid, static.stop_window)

  if static.num_beams > 1:
    return beam_search.beam_search(
      step,
      logits,
      cache,
      tokens,
      prompt_len=prompt,
      max_new=scalars["max_new_tokens"],
      num_beams=static.num_beams,
      num_return=static.num_return,
      eos_ids=scalars["eos_ids"],
      length_penalty=scalars["length_penalty"],
      early_stopping=static.early_stopping,
      process=process,
      stopped=stopped,
      reorder=decoder.select_cache_rows,
    )
  return _greedy_or_sample(step, logits, cache, tokens, static, scalars, key, process, stopped)


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 1))


def _greedy_or_sample(
  step, logits, cache, tokens, static: options.Static, scalars, key, process, stopped
):
  """transformers' `_sample`: finished rows emit pad; stops when all rows hit EOS."""
  batch = tokens.shape[0]
  prompt = tokens.shape[1] - static.capacity
  rows = jnp.arange(batch)
  eos = scalars["eos_ids"]

  def choose(logits, tokens, generated, finished):
    # transformers processes float32 logits.
    scores = process(logits.astype(jnp.float32), tokens, prompt + generated)
    if static.do_sample:
      scores = logits_processors.sampling_filter(
        scores, temperature=scalars["temperature"], top_k=scalars["top_k"], top_p=scalars["top_p"]
      )
      token = jax.random.categorical(jax.random.fold_in(key, generated), scores, axis=-1)
    else:
      token = jnp.argmax(scores, axis=-1)
    token = jnp.where(finished, static.pad_id, token.astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, prompt + generated))
    done = jnp.isin(token, eos) | stopped(tokens, prompt + generated + 1)
    return tokens, finished | done

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
