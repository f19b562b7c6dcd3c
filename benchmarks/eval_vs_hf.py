"""Evaluation speed: ours vs transformers on the same random weights (mid-size shape).

Two JSON lines:
  rec             64 REC queries (`<grounding><phrase>..</phrase>`, 8 new
                  tokens): ours `eval.rec.greedy_decode` vs transformers'
                  `generate`, same batch size, same processor outputs (the
                  processing is timed on both sides).
  classification  one image, 1,000 candidate names: ours `score_continuations`
                  (image and prompt once, names in batches against the KV
                  cache) vs one transformers forward pass per name over
                  prompt + name. Two peers: `hf_plain` passes the pixels
                  each time, as a plain forward does; `hf_image_once` passes
                  the image embeddings computed once and keeps only the
                  name's logits (`logits_to_keep`). Per-name forwards all cost
                  the same, so the peers are timed on `--hf-names` names and
                  scaled to all of them. `max_abs_diff` compares the scores.
Each line has this machine's matmul peak. Run:
`.venv/bin/python -m benchmarks.eval_vs_hf` (`--tiny`: seconds, for tests).
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
from kosmos_jax.eval import classification, rec
from kosmos_jax.models import scoring
from tests.helpers import spm


def _torch(inputs: dict) -> dict:
  return {k: torch.from_numpy(v) for k, v in inputs.items()}


def bench_rec(hf, ours, processor, args, common: dict) -> dict:
  rng = np.random.default_rng(0)
  words = spm.lexicon()
  prompts = [
    rec.prompt(" ".join(rng.choice(words, rng.integers(1, 5)))) for _ in range(args.queries)
  ]
  images = [rng.integers(0, 255, (96, 128, 3), np.uint8) for _ in range(args.queries)]

  def ours_rec():
    return rec.greedy_decode(
      ours, processor, prompts, images, batch_size=args.batch, max_new_tokens=args.new_tokens
    )

  def hf_rec():
    texts = []
    for start in range(0, len(prompts), args.batch):
      end = start + args.batch
      inputs = processor(text=prompts[start:end], images=images[start:end])
      with torch.no_grad():
        out = hf.generate(
          **_torch(inputs), max_new_tokens=args.new_tokens, do_sample=False, num_beams=1
        )
      texts += [processor.decode(ids, skip_special_tokens=True) for ids in out.numpy()]
    return texts

  start = time.perf_counter()
  got = ours_rec()
  first_s = time.perf_counter() - start
  want = hf_rec()  # warm-up
  ours_s, hf_s = timed_pair(ours_rec, hf_rec, args.repeats)
  return {
    "benchmark": "eval_vs_hf/rec",
    "queries": args.queries,
    "batch": args.batch,
    "new_tokens": args.new_tokens,
    "ours_s": round(ours_s, 3),
    "hf_s": round(hf_s, 3),
    "speedup": round(hf_s / ours_s, 2),
    "ours_first_call_s": round(first_s, 2),
    # Left-padded rows differ: transformers counts padding into new positions.
    "fraction_answers_equal": round(float(np.mean([a == b for a, b in zip(got, want)])), 3),
    **common,
  }


def bench_classification(hf, ours, processor, args, common: dict) -> dict:
  rng = np.random.default_rng(1)
  vocab_size = hf.config.text_config.vocab_size
  eos = processor.vocab.eos_id
  # ImageNet names are 1-4 sentencepiece tokens, then `</s>`.
  names = [
    [*rng.integers(100, vocab_size, rng.integers(1, 5)).tolist(), eos] for _ in range(args.names)
  ]
  image = rng.integers(0, 255, (96, 128, 3), np.uint8)
  inputs = processor(text=[classification.PROMPT], images=[image])
  arrays = [
    inputs[k] for k in ("input_ids", "pixel_values", "attention_mask", "image_embeds_position_mask")
  ]

  def ours_scores():
    return scoring.score_continuations(ours, *arrays, names, batch_size=args.name_batch)

  with torch.no_grad():
    image_embeds = hf(**_torch(inputs)).image_embeds
  sample = names[: args.hf_names]

  def row(name):
    """prompt + name, unpadded: our positions and transformers' agree."""
    extra = [(0, 0), (0, len(name))]
    return _torch(
      dict(
        input_ids=np.concatenate([inputs["input_ids"], [name]], axis=1),
        attention_mask=np.pad(inputs["attention_mask"], extra, constant_values=1),
        image_embeds_position_mask=np.pad(inputs["image_embeds_position_mask"], extra),
      )
    )

  def hf_scores(image_once: bool):
    scores = []
    for name in sample:
      with torch.no_grad():
        if image_once:
          kw = dict(image_embeds=image_embeds, logits_to_keep=len(name) + 1)
        else:
          kw = dict(pixel_values=torch.from_numpy(inputs["pixel_values"]))
        logits = hf(**row(name), **kw).logits
      logp = torch.log_softmax(logits[0, -len(name) - 1 : -1].float(), dim=-1)
      scores.append(float(logp[torch.arange(len(name)), torch.tensor(name)].sum()))
    return np.array(scores, np.float32)

  start = time.perf_counter()
  got = ours_scores()
  first_s = time.perf_counter() - start
  diff = float(np.abs(got[0, : len(sample)] - hf_scores(True)).max())
  hf_scores(False)  # warm-up
  ours_s, plain_s = timed_pair(ours_scores, lambda: hf_scores(False), args.repeats)
  once_s, _ = timed(lambda: hf_scores(True), args.repeats)
  scale = len(names) / len(sample)
  plain_s, once_s = plain_s * scale, once_s * scale
  return {
    "benchmark": "eval_vs_hf/classification",
    "names": len(names),
    "name_batch": args.name_batch,
    "prompt": inputs["input_ids"].shape[1],
    "ours_s": round(ours_s, 3),
    "hf_s": round(plain_s, 3),
    "speedup": round(plain_s / ours_s, 2),
    "hf_image_once_s": round(once_s, 3),
    "speedup_vs_image_once": round(once_s / ours_s, 2),
    "hf_names_timed": len(sample),
    "ours_first_call_s": round(first_s, 2),
    "max_abs_diff": round(diff, 6),
    **common,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--queries", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=8)
  parser.add_argument("--names", type=int, default=1000)
  parser.add_argument("--name-batch", type=int, default=128)
  parser.add_argument("--hf-names", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tiny", action="store_true", help="tiny shapes and counts (tests)")
  args = parser.parse_args()
  if args.tiny:
    args.queries, args.batch, args.names, args.name_batch = 4, 2, 20, 8
    args.hf_names, args.repeats = 5, 1

  hf, ours, processor = models_and_processor(args.tiny)
  common = run_record()
  print(json.dumps(bench_rec(hf, ours, processor, args, common)), flush=True)
  print(json.dumps(bench_classification(hf, ours, processor, args, common)), flush=True)


if __name__ == "__main__":
  main()
