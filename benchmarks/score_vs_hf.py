"""Scoring speed: `Kosmos2.score` vs transformers forward passes, same random weights.

One image, one prompt ("<image> An image of"), 1,000 candidate continuations of
1-6 tokens (KOSMOS-1's constrained classification, reference/evaluation.md 7),
on the mid-size model. Ours: `model.score` (the image and prompt run once; the
candidates in batches against their KV cache). The peer: one transformers
forward pass per batch of `--hf-batch` candidates, each row prompt + candidate
(right padded), the log-probabilities read at the candidate's tokens:
  hf_s             pixels in every row, as a plain forward does;
  hf_image_once_s  the image embeddings computed once and passed to each batch.
Every peer batch costs the same, so the peer is timed on `--hf-candidates`
candidates and scaled to all. `max_abs_diff` compares the summed scores of
the timed candidates. One JSON line with this machine's matmul peak. Run:
`.venv/bin/python -m benchmarks.score_vs_hf` (`--tiny`: seconds, for tests).
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from kosmos_jax import heap  # pylint: disable=g-import-not-at-top

# Both sides alike: glibc keeps freed memory (kosmos_jax/heap.py says why).
heap.keep_freed_memory()

import numpy as np
import torch

from benchmarks.common import models_and_processor, run_record, timed, timed_pair

PROMPT = "An image of"


def hf_scorer(hf, inputs: dict, candidates: list, batch: int, pad_id: int):
  """`score(image_once)`: summed log-probabilities of `candidates` from
  transformers forward passes, `batch` candidates (rows) per pass."""
  prompt = inputs["input_ids"][0]
  width = len(prompt) + max(map(len, candidates))
  with torch.no_grad():
    embeds = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}).image_embeds

  def score(image_once: bool) -> np.ndarray:
    out = []
    for start in range(0, len(candidates), batch):
      rows = candidates[start : start + batch]
      ids = np.full((len(rows), width), pad_id, np.int64)
      mask = np.zeros_like(ids)
      for r, c in enumerate(rows):
        ids[r, : len(prompt) + len(c)] = [*prompt, *c]
        mask[r, : len(prompt) + len(c)] = 1
      slots = np.zeros_like(ids)
      slots[:, : len(prompt)] = inputs["image_embeds_position_mask"][0]
      kw = dict(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        image_embeds_position_mask=torch.from_numpy(slots),
      )
      if image_once:
        kw["image_embeds"] = embeds.repeat(len(rows), 1, 1)
      else:
        pixels = np.repeat(inputs["pixel_values"], len(rows), axis=0)
        kw["pixel_values"] = torch.from_numpy(pixels)
      with torch.no_grad():
        logp = torch.log_softmax(hf(**kw).logits[:, len(prompt) - 1 : -1].float(), dim=-1)
      for r, c in enumerate(rows):
        out.append(float(logp[r, torch.arange(len(c)), torch.tensor(c)].sum()))
    return np.array(out, np.float32)

  return score


def bench(hf, ours, processor, args, common: dict) -> dict:
  rng = np.random.default_rng(0)
  vocab_size = hf.config.text_config.vocab_size
  candidates = [
    rng.integers(100, vocab_size - 1100, rng.integers(1, 7)).tolist()
    for _ in range(args.candidates)
  ]
  image = rng.integers(0, 255, (96, 128, 3), np.uint8)
  inputs = processor(text=[PROMPT], images=[image])
  arrays = {
    k: inputs[k]
    for k in ("input_ids", "pixel_values", "attention_mask", "image_embeds_position_mask")
  }

  def ours_scores():
    return np.asarray(ours.score(**arrays, candidates=candidates, batch_size=args.batch)["sum"])

  sample = candidates[: args.hf_candidates]
  hf_score = hf_scorer(hf, arrays, sample, args.hf_batch, hf.config.text_config.pad_token_id)
  start = time.perf_counter()
  got = ours_scores()
  first_s = time.perf_counter() - start
  diff = float(np.abs(got[0, : len(sample)] - hf_score(True)).max())
  hf_score(False)  # warm-up
  ours_s, plain_s = timed_pair(ours_scores, lambda: hf_score(False), args.repeats)
  once_s, _ = timed(lambda: hf_score(True), args.repeats)
  scale = len(candidates) / len(sample)
  plain_s, once_s = plain_s * scale, once_s * scale
  return {
    "benchmark": "score_vs_hf",
    "candidates": len(candidates),
    "candidate_tokens": [1, 6],
    "batch": args.batch,
    "hf_batch": args.hf_batch,
    "prompt": inputs["input_ids"].shape[1],
    "ours_s": round(ours_s, 3),
    "hf_s": round(plain_s, 3),
    "speedup": round(plain_s / ours_s, 2),
    "hf_image_once_s": round(once_s, 3),
    "speedup_vs_image_once": round(once_s / ours_s, 2),
    "hf_candidates_timed": len(sample),
    "ours_first_call_s": round(first_s, 2),
    "max_abs_diff": round(diff, 6),
    **common,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--candidates", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=128, help="our candidates per call")
  parser.add_argument("--hf-batch", type=int, default=50, help="the peer's rows per forward")
  parser.add_argument("--hf-candidates", type=int, default=100, help="timed, then scaled")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tiny", action="store_true", help="tiny shapes and counts (tests)")
  args = parser.parse_args()
  if args.tiny:
    args.candidates, args.batch, args.hf_batch, args.hf_candidates, args.repeats = 40, 16, 8, 16, 1

  hf, ours, processor = models_and_processor(args.tiny)
  common = run_record()
  print(json.dumps(bench(hf, ours, processor, args, common)), flush=True)


if __name__ == "__main__":
  main()
