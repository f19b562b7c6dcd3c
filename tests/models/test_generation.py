"""generate(): token-for-token equality with transformers' generate on random weights.

Left-padded batches are compared with transformers run on each row alone:
our positions follow fairseq (each new token one past the row's last), so a
padded row must generate what it generates unpadded. (transformers 5.x
counts left padding into new tokens' positions, so its own batched output
differs from its unpadded one.)
"""

import numpy as np
import pytest
import torch

import kosmos_jax
from kosmos_jax.models import generation
from tests.helpers.hf_reference import grounded_batch, random_hf_model

NEW = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  hf = random_hf_model("a", seed=1)
  # The released checkpoint's setting; transformers 5.23 ignores it from the
  # file, so the reference calls pass it explicitly.
  hf.generation_config.no_repeat_ngram_size = 3
  path = tmp_path_factory.mktemp("hf_generate")
  hf.save_pretrained(path)
  return hf, kosmos_jax.from_pretrained(str(path))


def _torch(batch):
  return {k: torch.from_numpy(v) for k, v in batch.items()}


def _hf_rows(hf, batch, images=True, **kwargs):
  """transformers' new tokens for each row of a left-padded batch, run alone."""
  kwargs.setdefault("no_repeat_ngram_size", 3)
  out = []
  for i, mask in enumerate(batch["attention_mask"]):
    start = int(np.argmax(mask))
    row = {k: v[i : i + 1, start:] for k, v in _torch(batch).items() if k != "pixel_values"}
    with torch.no_grad():
      if images:
        ids = hf.generate(**row, pixel_values=_torch(batch)["pixel_values"][i : i + 1], **kwargs)
      else:
        ids = hf.text_model.generate(
          input_ids=row["input_ids"], attention_mask=row["attention_mask"], **kwargs
        )
    out.append(ids[0, mask.size - start :].numpy())
  return out


def _assert_rows_equal(ours, batch, expected, pad=1):
  width = batch["input_ids"].shape[1]
  np.testing.assert_array_equal(ours[:, :width], batch["input_ids"])
  new = ours[:, width:]
  assert new.shape[1] == max(map(len, expected))
  for got, want in zip(new, expected):
    np.testing.assert_array_equal(got[: len(want)], want)
    assert (got[len(want) :] == pad).all()


def test_generation_config_is_read(pair):
  _, ours = pair
  assert ours.generation_config["no_repeat_ngram_size"] == 3
  assert ours.generation_config["eos_token_id"] == 2


def test_greedy_single_matches_exactly(pair):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[5], seed=1)
  with torch.no_grad():
    ref = hf.generate(**_torch(batch), max_new_tokens=NEW, no_repeat_ngram_size=3).numpy()
  got = ours.generate(**batch, max_new_tokens=NEW)
  np.testing.assert_array_equal(got, ref)
  assert len(set(got[0, -NEW:])) > 3  # n-gram blocking makes the random model vary


@pytest.mark.parametrize("num_beams", [1, 5])
def test_left_padded_batch_matches_rows_alone(pair, num_beams):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[2, 9, 5], seed=2)
  got = ours.generate(**batch, max_new_tokens=NEW, num_beams=num_beams)
  _assert_rows_equal(got, batch, _hf_rows(hf, batch, max_new_tokens=NEW, num_beams=num_beams))


def test_beam_search_single_matches_exactly(pair):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[4], seed=3)
  with torch.no_grad():
    ref = hf.generate(
      **_torch(batch), max_new_tokens=NEW, num_beams=5, no_repeat_ngram_size=3
    ).numpy()
  np.testing.assert_array_equal(ours.generate(**batch, max_new_tokens=NEW, num_beams=5), ref)


@pytest.mark.parametrize("num_beams", [1, 5])
def test_text_only_matches(pair, num_beams):
  hf, ours = pair
  rng = np.random.default_rng(4)
  rows = [[0, *rng.integers(20, 290, size=n)] for n in (3, 7)]  # <s> + text
  width = max(map(len, rows))
  text = dict(
    input_ids=np.ones((len(rows), width), np.int64),
    attention_mask=np.zeros((len(rows), width), np.int64),
  )
  for i, row in enumerate(rows):
    text["input_ids"][i, width - len(row) :] = row
    text["attention_mask"][i, width - len(row) :] = 1
  got = ours.generate(**text, max_new_tokens=NEW, num_beams=num_beams)
  want = _hf_rows(hf, text, images=False, max_new_tokens=NEW, num_beams=num_beams)
  _assert_rows_equal(got, text, want)


def test_explicit_argument_overrides_generation_config(pair):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[6], seed=5)
  with torch.no_grad():
    ref = hf.generate(**_torch(batch), max_new_tokens=NEW, no_repeat_ngram_size=2).numpy()
  np.testing.assert_array_equal(
    ours.generate(**batch, max_new_tokens=NEW, no_repeat_ngram_size=2), ref
  )


def test_eos_stops_rows_independently(pair):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[2, 9, 5], seed=2)
  plain = ours.generate(**batch, max_new_tokens=NEW)[:, batch["input_ids"].shape[1] :]
  # EOS := the token that row 0 first generates latest (but not at the end).
  firsts = {int(t): s for s, t in reversed(list(enumerate(plain[0])))}
  eos = max(firsts, key=lambda t: (firsts[t] < NEW - 2, firsts[t]))
  got = ours.generate(**batch, max_new_tokens=NEW, eos_token_id=eos)
  want = _hf_rows(hf, batch, max_new_tokens=NEW, eos_token_id=eos)
  # Row 0 stops early while another row goes on.
  assert want[0][-1] == eos and len(want[0]) < max(map(len, want))
  _assert_rows_equal(got, batch, want)


@pytest.mark.parametrize(
  "length_penalty,early_stopping", [(1.0, False), (-1.0, True), (2.0, "never")]
)
def test_beam_search_with_finished_hypotheses_matches(pair, length_penalty, early_stopping):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[4], seed=3)
  greedy = ours.generate(**batch, max_new_tokens=NEW)[0, -NEW:]
  eos = int(greedy[2])  # finishes some beams early
  kwargs = dict(
    max_new_tokens=NEW,
    num_beams=5,
    eos_token_id=eos,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
  )
  with torch.no_grad():
    ref = hf.generate(**_torch(batch), no_repeat_ngram_size=3, **kwargs).numpy()
  np.testing.assert_array_equal(ours.generate(**batch, **kwargs), ref)


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[3, 6], seed=6)
  sample = lambda **kw: ours.generate(
    **batch, max_new_tokens=NEW, do_sample=True, temperature=3.0, **kw
  )
  a, b = sample(seed=1), sample(seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, sample(seed=2))
  assert not np.array_equal(a, sample(seed=1, top_p=0.5))
  np.testing.assert_array_equal(sample(seed=3, top_k=1), ours.generate(**batch, max_new_tokens=NEW))


def test_prompt_length_and_budget_buckets_do_not_recompile(pair):
  hf, ours = pair
  run = lambda lengths, new: ours.generate(
    **grounded_batch(hf.config, lengths=lengths, seed=7), max_new_tokens=new
  )
  run([3, 1], 9)
  before = generation._generate_jit._cache_size()  # pylint: disable=protected-access
  run([5, 2], 11)  # another prompt length and budget, same buckets
  run([1, 6], 16)
  assert generation._generate_jit._cache_size() == before  # pylint: disable=protected-access
  run([30, 1], 9)  # prompt crosses into the next bucket
  assert generation._generate_jit._cache_size() == before + 1  # pylint: disable=protected-access


def test_bucket_length():
  assert [generation.bucket_length(n) for n in (1, 16, 17, 64, 65, 128, 129)] == [
    16,
    16,
    32,
    64,
    128,
    128,
    192,
  ]
