"""Float32 logits equal transformers' Kosmos2ForConditionalGeneration on random weights."""

import numpy as np
import pytest
import torch

import kosmos_jax
from tests.helpers.hf_reference import TINY_HF_CONFIGS, grounded_batch, random_hf_model

TOL = 1e-4  # max abs difference, relative to the largest logit


def _max_rel_err(ref, ours, mask):
  scale = max(1.0, float(np.abs(ref[mask]).max()))
  return float(np.abs(ref - ours)[mask].max()) / scale


@pytest.fixture(scope="module", params=sorted(TINY_HF_CONFIGS))
def pair(request, tmp_path_factory):
  hf = random_hf_model(request.param, seed=len(request.param))
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  hf.save_pretrained(path)
  return hf, kosmos_jax.from_pretrained(str(path))


def test_grounded_left_padded_batch_matches(pair):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[3, 11, 6], seed=1)
  with torch.no_grad():
    ref = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
  got = np.asarray(ours(**batch).logits)
  mask = batch["attention_mask"].astype(bool)
  assert got.shape == ref.shape
  assert np.abs(ref[mask]).max() > 2.0  # the comparison is not between near-zeros
  assert _max_rel_err(ref, got, mask) < TOL


def test_text_only_matches(pair):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[9, 2], seed=2)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  with torch.no_grad():
    ref = hf.text_model(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
    ).logits.numpy()
  got = np.asarray(ours(input_ids=ids, attention_mask=mask).logits)
  assert _max_rel_err(ref, got, mask.astype(bool)) < TOL


def test_image_embeds_match(pair):
  hf, ours = pair
  batch = grounded_batch(hf.config, lengths=[1, 1], seed=3)
  with torch.no_grad():
    ref = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).image_embeds.numpy()
  got = np.asarray(ours.encode_images(batch["pixel_values"]))
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_logits(pair):
  _, ours = pair
  hf_config = pair[0].config
  alone = grounded_batch(hf_config, lengths=[4], seed=4)
  padded = {k: np.concatenate([v, v]) for k, v in alone.items()}
  # Pad row 0 on the left by 5 tokens; row 1 keeps the unpadded layout.
  for key, fill in [("input_ids", 1), ("attention_mask", 0), ("image_embeds_position_mask", 0)]:
    padded[key] = np.pad(padded[key], [(0, 0), (5, 0)], constant_values=fill)
    padded[key][1] = np.roll(padded[key][1], -5)
    padded[key][1, -5:] = fill
  logits = np.asarray(ours(**padded).logits)
  np.testing.assert_allclose(logits[0, 5:], logits[1, :-5], atol=1e-5)
