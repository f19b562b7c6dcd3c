"""score_continuations equals the log-likelihood read from plain forward passes."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.models import scoring
from kosmos_jax.models.kosmos import Kosmos2

# Unsorted, lengths 1 to 9: batches of 3 then span block widths 4 and 8.
CANDIDATES = [[301, 302, 303], [400], [500, 501, 502, 503, 504, 505, 506, 507, 508], [600, 601]]
CANDIDATES += [[700, 701, 702, 703, 704], [400, 401], [900, 901, 902, 903]]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model(seed: int = 0, position: str = "sinusoidal") -> Kosmos2:
  config = config_lib.load(os.path.join(ROOT, "configs/tiny.py")).model
  config.text.position = position
  model = Kosmos2(config, rngs=nnx.Rngs(seed))
  # Logits of order 10, not 0.1, so that candidates' scores differ clearly.
  embed = model.text_model.embed_tokens
  embed[...] = embed[...] * 20
  return model


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def prompts(cfg, text_lengths, seed=0):
  """Left-padded rows laid out as the processor's: <s> <image> slots </image> text."""
  rng = np.random.default_rng(seed)
  latents, vocab = cfg.latent_query_num, cfg.text.vocab_size
  rows = [
    [0, vocab - 3, *range(4, 4 + latents), vocab - 2, *rng.integers(100, vocab - 3, n)]
    for n in text_lengths
  ]
  width = max(map(len, rows))
  ids = np.full((len(rows), width), cfg.text.pad_id, np.int64)
  mask, slots = np.zeros_like(ids), np.zeros_like(ids)
  for i, row in enumerate(rows):
    start = width - len(row)
    ids[i, start:], mask[i, start:] = row, 1
    slots[i, start + 2 : start + 2 + latents] = 1
  size = cfg.vision.image_size
  pixels = rng.standard_normal((len(rows), 3, size, size)).astype(np.float32)
  return dict(
    input_ids=ids, pixel_values=pixels, attention_mask=mask, image_embeds_position_mask=slots
  )


@nnx.jit
def _log_probs(model, *inputs):
  # Jitted: the eager forward pass takes longer than compiling it (7 s vs 2 s here).
  return jax.nn.log_softmax(model(*inputs).logits, axis=-1)


def full_forward_scores(model, batch, candidates):
  """Each (prompt, candidate) pair as one row of a plain forward pass."""
  pad = model.config.text.pad_id
  num, width = batch["input_ids"].shape
  total = width + max(map(len, candidates))
  pairs = [(p, c) for p in range(num) for c in candidates]
  ids = np.full((len(pairs), total), pad, np.int64)
  mask, slots = np.zeros_like(ids), np.zeros_like(ids)
  for r, (p, c) in enumerate(pairs):
    ids[r, :width], ids[r, width : width + len(c)] = batch["input_ids"][p], c
    mask[r, :width], mask[r, width : width + len(c)] = batch["attention_mask"][p], 1
    slots[r, :width] = batch["image_embeds_position_mask"][p]
  pixels = None
  if batch["pixel_values"] is not None:
    pixels = batch["pixel_values"][[p for p, _ in pairs]]
  logp = np.asarray(_log_probs(model, ids, pixels, mask, slots if pixels is not None else None))
  scores = [
    sum(logp[r, width + t - 1, token] for t, token in enumerate(c))
    for r, (_, c) in enumerate(pairs)
  ]
  return np.array(scores, np.float32).reshape(num, len(candidates))


def test_scores_equal_full_forward_with_left_padding(model):
  batch = prompts(model.config, [6, 2, 11])
  got = scoring.score_continuations(model, **batch, candidates=CANDIDATES, batch_size=3)
  want = full_forward_scores(model, batch, CANDIDATES)
  assert got.shape == (3, len(CANDIDATES)) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert np.ptp(want) > 10  # the model tells the candidates apart


def test_xpos_scores_equal_full_forward():
  # KOSMOS-1's relative positions: the candidates sit at the cache slots after the prompt.
  model = tiny_model(position="xpos")
  batch = prompts(model.config, [5, 1])
  got = scoring.score_continuations(model, **batch, candidates=CANDIDATES[:4], batch_size=2)
  np.testing.assert_allclose(
    got, full_forward_scores(model, batch, CANDIDATES[:4]), rtol=1e-5, atol=1e-4
  )


def test_text_only_prompts(model):
  batch = prompts(model.config, [4, 1])
  batch.update(pixel_values=None, image_embeds_position_mask=np.zeros_like(batch["input_ids"]))
  got = scoring.score_continuations(model, **batch, candidates=CANDIDATES[:4])
  np.testing.assert_allclose(
    got, full_forward_scores(model, batch, CANDIDATES[:4]), rtol=1e-5, atol=1e-4
  )


def test_one_prefill_per_prompt_and_one_call_per_candidate_batch(model, monkeypatch):
  calls = {"prefill": 0, "score": 0}

  def counting(name, fn):
    def wrapper(*args):
      calls[name] += 1
      return fn(*args)

    return wrapper

  monkeypatch.setattr(scoring, "_prefill_jit", counting("prefill", scoring._prefill_jit))
  monkeypatch.setattr(scoring, "_score_jit", counting("score", scoring._score_jit))
  batch = prompts(model.config, [3, 5])
  scoring.score_continuations(model, **batch, candidates=CANDIDATES, batch_size=3)
  assert calls == {"prefill": 2, "score": 2 * 3}


def test_batches_are_even_and_sorted_by_length():
  candidates = [[5] * n for n in (3, 1, 2, 9, 1, 4, 2)]
  batches = scoring._candidate_batches(candidates, batch_size=3, pad_id=1)
  assert [len(rows) for rows, _, _ in batches] == [3, 3, 1]
  assert [t.shape for _, t, _ in batches] == [(3, 5), (3, 5), (3, 9)]
  lengths = [len(candidates[i]) for rows, _, _ in batches for i in rows]
  assert lengths == sorted(lengths)
  assert np.asarray(batches[-1][2]).tolist() == [9, 0, 0]  # filled with empty rows


def test_rejects_empty_candidates(model):
  batch = prompts(model.config, [2])
  with pytest.raises(ValueError, match="non-empty"):
    scoring.score_continuations(model, **batch, candidates=[[5], []])
  with pytest.raises(ValueError, match="non-empty"):
    scoring.score_continuations(model, **batch, candidates=[])


def test_model_score_gives_sums_and_per_token_means(model):
  batch = prompts(model.config, [6, 2])
  got = model.score(**batch, candidates=CANDIDATES, batch_size=3)
  want = scoring.score_continuations(model, **batch, candidates=CANDIDATES, batch_size=3)
  np.testing.assert_allclose(got["sum"], want, rtol=1e-6)
  lengths = np.array([len(c) for c in CANDIDATES], np.float32)
  np.testing.assert_allclose(got["mean"], want / lengths, rtol=1e-6)
