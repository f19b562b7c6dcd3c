"""Beam search exactly as transformers 5.x `GenerationMixin._beam_search`.

The same vectorised algorithm with static shapes: each step keeps the top
2 x beams (1 + number of EOS ids, at least 2) continuations, the best `beams`
that did not finish continue, and finished hypotheses (scored with the length
penalty) compete for the `beams` output slots. Stops when no batch item can
still improve (the early-stopping heuristic), or at max_new tokens. Float32
throughout, with transformers' -1e9 sentinels, so ties resolve alike.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

_NEG = -1.0e9


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [b, n, ...], index [b, m] -> x[b, index[b, m], ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def beam_search(
  step: Callable,
  logits: jax.Array,
  cache: dict,
  tokens: jax.Array,
  *,
  prompt_len: int,
  max_new: jax.Array,
  num_beams: int,
  eos_ids: jax.Array,
  length_penalty: jax.Array,
  early_stopping: bool | str,
  process: Callable,
  reorder: Callable,
  stopped: Callable | None = None,
  num_return: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """Beam search from a prefilled prompt.

  Args:
    step: `(cache, token [b*beams], generated, rows) -> (logits, cache)`,
      one cached decoder step (see generate._prefill).
    logits: [b, vocab] prefill logits; cache: the prefilled cache of b rows.
    tokens: [b, prompt_len + capacity], the prompt then pad.
    max_new: new-token budget (traced); length_penalty: traced float;
    eos_ids: traced int32 [k] (k static: it sets the candidates kept).
    early_stopping: True, False or "never", as in transformers.
    process: `(scores, tokens, cur_len) -> scores`, the logits processors.
    reorder: `(cache, rows [n]) -> cache` with the given rows of `cache`
      (the model's cache layout stays the model's business).
    stopped: `(sequences [n, total], length) -> bool [n]`, transformers'
      other stopping criteria (stop strings) on each candidate's first
      `length` tokens.
    num_return: hypotheses returned per item, best first.

  Returns:
    (the best `num_return` sequences per item [b * num_return, prompt_len +
    capacity], rows of item i consecutive; number of new tokens to keep: the
    longest returned hypothesis).
  """
  batch, total = tokens.shape
  vocab = logits.shape[-1]
  k = num_beams
  keep = max(2, 1 + eos_ids.shape[0]) * k
  # Beams of item i are rows i*k .. i*k+k-1, as transformers' repeat_interleave.
  rows = jnp.repeat(jnp.arange(batch), k)
  cache = reorder(cache, rows)
  logits = logits[rows]
  running = jnp.repeat(tokens[:, None], k, axis=1)
  state = dict(
    running=running,
    running_scores=jnp.full((batch, k), _NEG, jnp.float32).at[:, 0].set(0.0),
    sequences=running,
    scores=jnp.full((batch, k), _NEG, jnp.float32),
    finished=jnp.zeros((batch, k), bool),
    lengths=jnp.zeros((batch, k), jnp.int32),
    improvable=jnp.ones((batch, 1), bool),
    generated=jnp.int32(0),
    go_on=jnp.bool_(True),
  )
  top_beams = jnp.arange(keep) < k
  offsets = jnp.arange(batch)[:, None] * k

  def update(state, logits):
    g = state["generated"]
    cur = prompt_len + g
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_probs = process(log_probs, state["running"].reshape(batch * k, total), cur)
    log_probs = log_probs.reshape(batch, k, vocab) + state["running_scores"][..., None]
    top_scores, top_index = jax.lax.top_k(log_probs.reshape(batch, k * vocab), keep)
    source = top_index // vocab
    token = (top_index % vocab).astype(jnp.int32)
    candidates = _gather(state["running"], source)
    candidates = jax.lax.dynamic_update_slice(candidates, token[..., None], (0, 0, cur))
    hits = jnp.isin(token, eos_ids) | (g + 1 >= max_new)
    if stopped is not None:
      hits |= stopped(candidates.reshape(batch * keep, total), cur + 1).reshape(batch, keep)

    # Unfinished candidates continue.
    running_scores = top_scores + hits.astype(jnp.float32) * _NEG
    _, best = jax.lax.top_k(running_scores, k)
    order = (_gather(source, best) + offsets).reshape(-1)

    # Finished candidates among the top k compete for the output slots.
    just_finished = hits & top_beams[None, :]
    scored = top_scores / ((g + 1).astype(jnp.float32) ** length_penalty)
    if early_stopping is True:
      scored += (state["finished"].all(-1, keepdims=True)).astype(jnp.float32) * _NEG
    scored += (~state["improvable"]).astype(jnp.float32) * _NEG
    scored += (~just_finished).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([state["scores"], scored], axis=1)
    _, chosen = jax.lax.top_k(merged_scores, k)
    pick = lambda a, b: _gather(jnp.concatenate([a, b], axis=1), chosen)
    new = dict(
      running=_gather(candidates, best),
      running_scores=_gather(running_scores, best),
      sequences=pick(state["sequences"], candidates),
      scores=_gather(merged_scores, chosen),
      finished=pick(state["finished"], just_finished),
      lengths=pick(state["lengths"], jnp.full((batch, keep), g + 1, jnp.int32)),
      generated=g + 1,
    )

    # transformers' _check_early_stop_heuristic and stopping condition.
    hypothetical = g + 1
    if early_stopping == "never":
      hypothetical = jnp.where(length_penalty > 0.0, max_new, g + 1)
    best_possible = new["running_scores"][:, :1] / (
      hypothetical.astype(jnp.float32) ** length_penalty
    )
    worst_finished = jnp.where(new["finished"], new["scores"].min(1, keepdims=True), _NEG)
    new["improvable"] = state["improvable"] & (best_possible > worst_finished).any(
      -1, keepdims=True
    )
    go_on = new["improvable"].any() & ~hits.all()
    if early_stopping is True:
      go_on &= ~new["finished"].all()
    new["go_on"] = go_on
    return new, order

  state, order = update(state, logits)
  cache = reorder(cache, order)

  def body(carry):
    state, cache = carry
    g = state["generated"]
    last = jax.lax.dynamic_index_in_dim(
      state["running"], prompt_len + g - 1, axis=2, keepdims=False
    ).reshape(-1)
    logits, cache = step(cache, last, g, rows)
    state, order = update(state, logits)
    return state, reorder(cache, order)

  state, _ = jax.lax.while_loop(lambda c: c[0]["go_on"], body, (state, cache))
  best = state["sequences"][:, :num_return].reshape(batch * num_return, total)
  return best, state["lengths"][:, :num_return].max()
