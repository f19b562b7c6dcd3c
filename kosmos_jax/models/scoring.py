"""Log-likelihoods of many continuations of one prompt (constrained classification).

Scoring 1,000 class names after "<image> The photo of the" with a full
forward pass each would run the vision tower and the 70-odd prompt tokens
1,000 times. Here each prompt's image is encoded and the prompt prefilled
once (one jit call); the candidates then run in batches (one jit call per
batch) through the decoder against that prompt's keys and values, which
every row of the batch shares without copying them.

A candidate's score is the sum of its tokens' log-probabilities: the first
from the prompt's last logits, the others from the candidate block, whose
input is the candidate minus its last token. Candidates are sorted by length
and each batch is padded to a multiple of 4 tokens, so a batch of 2-token
names does not pay for the longest name, and a set of names compiles a few
shapes at most. Positions follow generation.py: a candidate's token t sits at
the prompt's last position + 1 + t, left padding not counted. The result
equals the log-likelihood read from the model's plain forward pass over
prompt + candidate (tests/models/test_scoring.py).
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kosmos_jax.models import decoder, generation, layers

# Candidate blocks are padded to a multiple of this many tokens.
_WIDTH_STEP = 4


def score_continuations(
  model,
  input_ids: Any,
  pixel_values: Any,
  attention_mask: Any,
  image_embeds_position_mask: Any,
  candidates: Sequence[Sequence[int]],
  *,
  batch_size: int = 128,
  modality_embeds: Any = None,
  modality_types: Any = None,
) -> np.ndarray:
  """Sums of the log-probabilities of each candidate's tokens after each prompt.

  Args:
    model: a `Kosmos2`.
    input_ids, pixel_values, attention_mask, image_embeds_position_mask: the
      processor's outputs for `num_prompts` left-padded prompts (pixel_values
      and the slot mask may be None: text only).
    candidates: token ids of each continuation (none empty); each is scored
      as a whole after every prompt, e.g. a class name and `</s>`.
    batch_size: candidates per decoder call. Logits of batch_size x tokens
      positions over the vocabulary are held at once (float32).
    modality_embeds, modality_types: other-modality inputs of the prompts
      (the processor's), for the slots the mask marks 2.

  Returns:
    float32 [num_prompts, num_candidates].
  """
  ids = np.asarray(input_ids, np.int64)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
  generation.check_slot_inputs(pixel_values, image_embeds_position_mask, modality_embeds)
  if not candidates or not all(len(c) for c in candidates):
    raise ValueError("candidates must be a non-empty list of non-empty token lists")
  pad_id = model.config.text.pad_id
  mask = ids != pad_id if attention_mask is None else np.asarray(attention_mask)
  slots = (
    np.zeros_like(ids)
    if image_embeds_position_mask is None
    else np.asarray(image_embeds_position_mask)
  )
  # The prompt is bucketed as generate() buckets it: new lengths seldom recompile.
  extra = [(0, 0), (generation.bucket_length(ids.shape[1]) - ids.shape[1], 0)]
  prompts = [
    jnp.asarray(np.pad(ids, extra, constant_values=pad_id), jnp.int32),
    jnp.asarray(np.pad(mask, extra), jnp.int32),
    jnp.asarray(np.pad(slots, extra), jnp.int32),
  ]
  batches = _candidate_batches(candidates, batch_size, pad_id)
  others = (pixel_values, modality_embeds, modality_types)  # per prompt, or None
  graphdef, state = nnx.split(model)
  scores = []
  for p in range(ids.shape[0]):
    rows = [None if x is None else jnp.asarray(np.asarray(x)[p : p + 1]) for x in others]
    prompt = _prefill_jit(graphdef, state, *(a[p : p + 1] for a in prompts), *rows)
    scores.append([_score_jit(graphdef, state, prompt, t, n) for _, t, n in batches])
  # Read back once at the end: the calls above queue without waiting.
  out = np.zeros((ids.shape[0], len(candidates)), np.float32)
  for p, row in enumerate(scores):
    for (rows, _, _), batch_scores in zip(batches, row):
      out[p, rows] = np.asarray(batch_scores)[: len(rows)]
  return out


def _candidate_batches(candidates, batch_size: int, pad_id: int):
  """[(candidate indices, tokens [rows, width + 1], lengths [rows])], by length.

  Batches are equal in rows (the last one filled with empty rows), so
  1,000 names in batches of 128 make 8 batches of 125 rather than 7 of 128
  and one of 104 padded to 128.
  """
  order = sorted(range(len(candidates)), key=lambda i: len(candidates[i]))
  num_batches = -(-len(order) // max(1, batch_size))
  rows = -(-len(order) // num_batches)
  batches = []
  for start in range(0, len(order), rows):
    members = order[start : start + rows]
    longest = max(len(candidates[i]) for i in members)
    width = -(-max(longest - 1, 1) // _WIDTH_STEP) * _WIDTH_STEP
    tokens = np.full((rows, width + 1), pad_id, np.int32)
    lengths = np.zeros((rows,), np.int32)
    for r, i in enumerate(members):
      tokens[r, : len(candidates[i])] = candidates[i]
      lengths[r] = len(candidates[i])
    batches.append((np.asarray(members), jnp.asarray(tokens), jnp.asarray(lengths)))
  return batches


@functools.partial(jax.jit, static_argnums=0)
def _prefill_jit(graphdef, state, ids, mask, slots, pixel_values, modality_embeds, modality_types):
  """Encodes the image and other modalities (each may be None) and prefills
  one prompt [1, P]. Returns its keys and values [layers, P, heads,
  head_dim], which keys are real, the next-token log-probabilities and the
  last position."""
  model = nnx.merge(graphdef, state)
  text = model.text_model
  image_embeds = None if pixel_values is None else model.encode_images(pixel_values)
  hidden = text.embed(
    ids,
    image_embeds=image_embeds,
    image_embeds_position_mask=slots,
    modality_tokens=model.encode_modalities(modality_embeds, modality_types),
  )
  logits, cache = text.decode(hidden, text.init_cache(1, ids.shape[1]), segment_ids=mask)
  return dict(
    k=cache["k"][:, 0],
    v=cache["v"][:, 0],
    real=mask[0] != 0,
    logprobs=jax.nn.log_softmax(logits[0]),
    last_position=decoder.positions_from_ids(ids, text.cfg.pad_id).max(),
  )


@functools.partial(jax.jit, static_argnums=0)
def _score_jit(graphdef, state, prompt, tokens, lengths):
  """Scores of one candidate batch: tokens [b, w + 1], lengths [b] -> [b]."""
  text = nnx.merge(graphdef, state).text_model
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  # Input t is needed when token t + 1 is in the candidate; the others (the
  # last token and padding) only feed outputs that are dropped.
  needed = jnp.arange(inputs.shape[1])[None] < lengths[:, None] - 1
  positions = prompt["last_position"] + 1 + jnp.arange(inputs.shape[1])[None]
  x = text.embed(inputs, position_ids=jnp.where(needed, positions, text.cfg.pad_id))

  def block(layer, x, kv, i):
    # The block's own projections and FFN: scoring cannot drift from __call__.
    attn = layer.self_attn
    h = layer.self_attn_layer_norm(x)
    # Cache slots as xPos positions (the prompt fills 0..P-1, candidate
    # token t is slot P + t), as generation's cached path counts them.
    slots = prompt["k"].shape[-3] + jnp.arange(inputs.shape[1])[None]
    q, k, v = attn._project(h, h, slots)
    ctx = _attend(q, k, v, kv[0][i], kv[1][i], prompt["real"], needed)
    return layer._ffn(x + attn._output(ctx)), kv

  x, _ = layers.scan_cached(text.layers, block, x, (prompt["k"], prompt["v"]))
  logits = text._logits(x)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  later = jnp.where(needed, picked - jax.nn.logsumexp(logits, axis=-1), 0.0).sum(axis=1)
  first = jnp.where(lengths > 0, prompt["logprobs"][tokens[:, 0]], 0.0)
  return first + later


def _attend(q, k, v, prompt_k, prompt_v, prompt_real, real):
  """Causal attention of a candidate block over the shared prompt and itself.

  q, k, v [b, l, h, d]; prompt_k, prompt_v [P, h, d] (one copy for all rows);
  prompt_real [P]; real [b, l]. The same arithmetic as attention._xla over
  the keys prompt + block.
  """
  scale = q.shape[-1] ** -0.5
  f32 = jnp.float32
  to_prompt = jnp.einsum("bqhd,khd->bhqk", q, prompt_k, preferred_element_type=f32) * scale
  to_self = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32) * scale
  length = q.shape[1]
  causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  low = jnp.finfo(f32).min
  to_prompt = jnp.where(prompt_real[None, None, None, :], to_prompt, low)
  to_self = jnp.where(causal[None, None] & real[:, None, None, :], to_self, low)
  probs = jax.nn.softmax(jnp.concatenate([to_prompt, to_self], axis=-1), axis=-1).astype(v.dtype)
  split = prompt_k.shape[0]
  return jnp.einsum("bhqk,khd->bqhd", probs[..., :split], prompt_v) + jnp.einsum(
    "bhqk,bkhd->bqhd", probs[..., split:], v
  )
