"""Greedy generation: ours (KV cache, one jit loop) vs transformers' generate.

Same random weights (the mid-size shape), same batch of images and prompts.
One JSON line per `no_repeat_ngram_size` (0, and 3 as the released
generation config sets it), so what the n-gram ban costs each side shows
beside the model's own time; our first call (tracing + compilation) is
reported separately from the steady-state time. Run:
`.venv/bin/python -m benchmarks.generate_vs_hf [--no-repeat-ngram-size 0 3]`.
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from kosmos_jax import heap  # pylint: disable=g-import-not-at-top

# Both sides alike: glibc keeps freed memory (kosmos_jax/heap.py says why).
heap.keep_freed_memory()

import torch
import transformers

from benchmarks.common import MID_HF_CONFIG, run_record, same_weights, timed_pair
from tests.helpers.hf_reference import grounded_batch


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--text-tokens", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--no-repeat-ngram-size", type=int, nargs="+", default=[0, 3])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  transformers.logging.set_verbosity_error()  # eos_token_id=-1 (below) is deliberate
  hf, ours = same_weights(transformers.Kosmos2Config(**MID_HF_CONFIG))
  hf.eval()
  batch = grounded_batch(hf.config, [args.text_tokens] * args.batch)
  for ngram in args.no_repeat_ngram_size:
    print(json.dumps(_compare(hf, ours, batch, args, ngram)), flush=True)


def _compare(hf, ours, batch, args, ngram: int) -> dict:
  torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
  # EOS disabled on both sides so that every row generates the full budget.
  options = dict(max_new_tokens=args.new_tokens, eos_token_id=-1, no_repeat_ngram_size=ngram)

  def ours_generate():
    return ours.generate(**batch, **options)

  def hf_generate():
    with torch.no_grad():
      return hf.generate(**torch_batch, do_sample=False, **options).numpy()

  start = time.perf_counter()
  ours_generate()
  first_s = time.perf_counter() - start
  hf_generate()  # warm-up
  ours_s, hf_s = timed_pair(ours_generate, hf_generate, args.repeats)

  got, want = ours_generate(), hf_generate()
  prompt = batch["input_ids"].shape[1]
  same = got.shape == want.shape and float((got[:, prompt:] == want[:, prompt:]).mean())
  return {
    "benchmark": "generate_vs_hf",
    "batch": args.batch,
    "prompt": prompt,
    "new_tokens": args.new_tokens,
    "no_repeat_ngram_size": ngram,
    "ours_s": round(ours_s, 3),
    "hf_s": round(hf_s, 3),
    "speedup": round(hf_s / ours_s, 2),
    "ours_first_call_s": round(first_s, 2),
    "ours_compile_s": round(first_s - ours_s, 2),
    "ours_tokens_per_s": round(args.batch * args.new_tokens / ours_s, 1),
    "hf_tokens_per_s": round(args.batch * args.new_tokens / hf_s, 1),
    "fraction_new_tokens_equal": same,
    **run_record(),
  }


if __name__ == "__main__":
  main()
