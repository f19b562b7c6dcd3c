"""generate()'s transformers options: min_new_tokens / min_length, repetition_penalty,
several EOS ids, stop_strings, num_return_sequences; each equal to transformers'
Kosmos2ForConditionalGeneration.generate on random weights, greedy and beam.

One random model whose vocabulary is the tiny sentencepiece processor's, so
stop strings compare with transformers' tokenizer-based StopStringCriteria.
Left-padded batches are compared with transformers on each row alone (see
test_generation.py).
"""

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.generation.stopping_criteria import StopStringCriteria

import kosmos_jax
from kosmos_jax.models import generation
from kosmos_jax.search import stop_strings
from tests.helpers import hf_reference
from tests.helpers.hf_reference import grounded_batch

NEW = 10
NGRAM = 3  # the released setting; it makes the random model's text vary


@pytest.fixture(scope="module")
def tokenizers(tiny_snapshot):
  snap = str(tiny_snapshot / "snap")
  return transformers.AutoTokenizer.from_pretrained(snap), kosmos_jax.Processor.from_pretrained(
    snap
  )


@pytest.fixture(scope="module")
def pair(tokenizers, tmp_path_factory):
  """transformers' model and ours, with the processor's vocabulary size."""
  config = dict(hf_reference.TINY_HF_CONFIGS["a"])
  config["text_config"] = dict(config["text_config"], vocab_size=len(tokenizers[0]))
  hf_reference.TINY_HF_CONFIGS["a_spm"] = config
  try:
    hf = hf_reference.random_hf_model("a_spm", seed=2)
  finally:
    del hf_reference.TINY_HF_CONFIGS["a_spm"]
  path = tmp_path_factory.mktemp("hf_generate_options")
  hf.save_pretrained(path)
  return hf, kosmos_jax.from_pretrained(str(path))


@pytest.fixture(scope="module")
def batch(pair):
  return grounded_batch(pair[0].config, lengths=[2, 7, 4], seed=11)


def _ours(model, batch, **kwargs):
  return generation.generate(
    model, **batch, max_new_tokens=NEW, no_repeat_ngram_size=NGRAM, **kwargs
  )


def _hf_rows(hf, batch, per_row=None, **kwargs):
  """transformers' outputs for each row of a left-padded batch, run alone,
  without the prompt: [rows, returned sequences, new tokens]. per_row:
  row width -> more arguments for that row."""
  out = []
  for i, mask in enumerate(batch["attention_mask"]):
    start = int(np.argmax(mask))
    row = {k: torch.from_numpy(v[i : i + 1, start:]) for k, v in batch.items() if v.ndim == 2}
    extra = per_row(mask.size - start) if per_row else {}
    with torch.no_grad():
      ids = hf.generate(
        **row,
        pixel_values=torch.from_numpy(batch["pixel_values"][i : i + 1]),
        max_new_tokens=NEW,
        no_repeat_ngram_size=NGRAM,
        **kwargs,
        **extra,
      )
    out.append(ids[:, mask.size - start :].numpy())
  return out


def _assert_matches(ours, batch, want, pad=1):
  width = batch["input_ids"].shape[1]
  per_row = want[0].shape[0]
  np.testing.assert_array_equal(ours[:, :width], np.repeat(batch["input_ids"], per_row, 0))
  new = ours[:, width:].reshape(len(want), per_row, -1)
  assert new.shape[2] == max(w.shape[1] for w in want)
  for got, w in zip(new, want):
    np.testing.assert_array_equal(got[:, : w.shape[1]], w)
    assert (got[:, w.shape[1] :] == pad).all()


def _two_early_tokens(ours, batch):
  """Two tokens that greedy search emits early: EOS ids that end rows soon."""
  plain = _ours(ours, batch)[:, batch["input_ids"].shape[1] :]
  firsts = list(dict.fromkeys(plain[:, 1:].T.ravel().tolist()))
  return firsts[:2]


@pytest.mark.parametrize("num_beams", [1, 4])
def test_min_new_tokens_with_several_eos_ids(pair, batch, num_beams):
  hf, ours = pair
  eos = _two_early_tokens(ours, batch)
  for kwargs in (dict(eos_token_id=eos), dict(eos_token_id=eos, min_new_tokens=6)):
    want = _hf_rows(hf, batch, num_beams=num_beams, **kwargs)
    _assert_matches(_ours(ours, batch, num_beams=num_beams, **kwargs), batch, want)
    if "min_new_tokens" not in kwargs:  # some row ends on its 2nd token
      assert min(w.shape[1] for w in want) <= 3
  assert min(w.shape[1] for w in want) >= 7


@pytest.mark.parametrize("num_beams", [1, 4])
def test_min_length_counts_the_prompt(pair, batch, num_beams):
  hf, ours = pair
  eos = _two_early_tokens(ours, batch)
  width = batch["input_ids"].shape[1]
  got = _ours(ours, batch, eos_token_id=eos, num_beams=num_beams, min_length=width + 5)
  # Each row alone is narrower than the padded batch: the same 5 new tokens.
  per_row = lambda w: dict(min_length=w + 5)
  _assert_matches(got, batch, _hf_rows(hf, batch, per_row, eos_token_id=eos, num_beams=num_beams))
  assert not np.isin(got[:, width : width + 5], eos).any()


@pytest.mark.parametrize("num_beams", [1, 4])
def test_repetition_penalty(pair, batch, num_beams):
  hf, ours = pair
  plain = _ours(ours, batch, num_beams=num_beams)
  for penalty in (1.8, 0.6):
    got = _ours(ours, batch, num_beams=num_beams, repetition_penalty=penalty)
    want = _hf_rows(hf, batch, num_beams=num_beams, repetition_penalty=penalty)
    _assert_matches(got, batch, want)
    assert not np.array_equal(got, plain)


def test_num_return_sequences_beam_search(pair, batch):
  hf, ours = pair
  got = _ours(ours, batch, num_beams=4, num_return_sequences=3)
  assert got.shape[0] == 9
  _assert_matches(got, batch, _hf_rows(hf, batch, num_beams=4, num_return_sequences=3))
  np.testing.assert_array_equal(got[::3], _ours(ours, batch, num_beams=4))  # best first


def test_num_return_sequences_sampling_repeats_rows(pair, batch):
  _, ours = pair
  sample = lambda seed: _ours(
    ours, batch, do_sample=True, temperature=3.0, num_return_sequences=2, seed=seed
  )
  got = sample(1)
  width = batch["input_ids"].shape[1]
  assert got.shape[0] == 6
  np.testing.assert_array_equal(got[:, :width], np.repeat(batch["input_ids"], 2, 0))
  assert not np.array_equal(got[0::2, width:], got[1::2, width:])
  np.testing.assert_array_equal(got, sample(1))


def test_num_return_sequences_is_checked(pair, batch):
  _, ours = pair
  with pytest.raises(ValueError, match="greedy search returns one sequence"):
    _ours(ours, batch, num_return_sequences=2)
  with pytest.raises(ValueError, match="more than num_beams"):
    _ours(ours, batch, num_beams=2, num_return_sequences=3)


def _stop_string(processor, new_tokens, at):
  """A string spanning new tokens at-1 and at: the end of one, the start of the next."""
  texts = [processor.vocab.id_to_token(int(t)).replace("\u2581", " ") for t in new_tokens]
  return texts[at - 1][-2:] + texts[at][:1]


@pytest.mark.parametrize("num_beams", [1, 4])
def test_stop_strings(pair, batch, tokenizers, num_beams):
  hf, ours = pair
  hf_tokenizer, processor = tokenizers
  plain = _ours(ours, batch, num_beams=num_beams)[:, batch["input_ids"].shape[1] :]
  stops = [_stop_string(processor, plain[0], 4), _stop_string(processor, plain[2], 6)]
  got = _ours(ours, batch, num_beams=num_beams, stop_strings=stops, tokenizer=processor)
  want = _hf_rows(hf, batch, num_beams=num_beams, stop_strings=stops, tokenizer=hf_tokenizer)
  _assert_matches(got, batch, want)
  if num_beams == 1:  # greedy rows end at the token that completes a string
    assert want[0].shape[1] <= 5 and want[2].shape[1] <= 7
  assert min(w.shape[1] for w in want) < NEW


def test_stop_string_overhangs_and_misses():
  """transformers' StopStringCriteria examples for "stop"."""
  texts = "st op stop opera sto pper las topper s to pped at tion".split()
  table, window = stop_strings.build(texts, ["stop"], len(texts))
  rows = [
    ["st", "op"],
    ["stop"],
    ["st", "opera"],
    ["sto", "pper"],
    ["las", "topper"],
    ["s", "to", "pped"],
    ["stop", "at"],
    ["st", "op", "at"],
    ["st", "opera", "tion"],
  ]
  ids = np.zeros((len(rows), 4), np.int32)
  for i, row in enumerate(rows):
    ids[i, 4 - len(row) :] = [texts.index(t) for t in row]
  valid = np.arange(4) >= 4 - np.array([len(r) for r in rows])[:, None]
  got = stop_strings.matches(table, ids, 4, valid, window)
  np.testing.assert_array_equal(got, [True] * 6 + [False] * 3)


def test_stop_string_walk_matches_transformers(tokenizers):
  """The jitted walk against StopStringCriteria on random token sequences."""
  hf_tokenizer, processor = tokenizers
  stops = ["ab", "a b", "ka.", "zz"]
  texts = [processor.vocab.id_to_token(i).replace("\u2581", " ") for i in range(2037)]
  table, window = stop_strings.build(texts, stops, len(texts))
  # Tokens made of the strings' characters, so that many sequences match.
  pool = [i for i, t in enumerate(texts) if t and set(t) <= set("ab .kz")]
  rng = np.random.default_rng(0)
  ids = rng.choice(pool, size=(3000, 8))
  want = StopStringCriteria(hf_tokenizer, stops)(torch.from_numpy(ids), None).numpy()
  match = jax.jit(stop_strings.matches, static_argnums=4)
  got = match(table, ids, ids.shape[1], np.ones(ids.shape, bool), window)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert 100 < want.sum() < 2900
  with pytest.raises(ValueError, match="no token of the vocabulary can end it"):
    stop_strings.build(texts, ["\u2603"], len(texts))


def test_option_values_do_not_recompile(pair, batch, tokenizers):
  _, ours = pair
  run = lambda **kw: _ours(ours, batch, tokenizer=tokenizers[1], **kw)
  run()
  run(stop_strings=["ab", "zz"])
  before = generation._generate_jit._cache_size()  # pylint: disable=protected-access
  run(eos_token_id=5, min_new_tokens=4, repetition_penalty=1.2)
  run(eos_token_id=7, min_length=40, repetition_penalty=0.7)
  run(stop_strings=["ka.", "b b"], eos_token_id=5, min_new_tokens=3, repetition_penalty=1.3)
  run(stop_strings=["a", "abcdefgh"], min_length=40)
  assert generation._generate_jit._cache_size() == before  # pylint: disable=protected-access
