"""Forward pass: ours (jit, after compilation) vs transformers, same weights and inputs.

Prints one JSON line. Run: `.venv/bin/python -m benchmarks.forward_vs_hf`.
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from kosmos_jax import heap  # pylint: disable=g-import-not-at-top

# Both sides alike: glibc keeps freed memory (kosmos_jax/heap.py says why).
heap.keep_freed_memory()

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import torch
import transformers
from flax import nnx

from benchmarks.common import MID_HF_CONFIG, same_weights, timed_pair
from tests.helpers.hf_reference import grounded_batch


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--text-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  hf, ours = same_weights(transformers.Kosmos2Config(**MID_HF_CONFIG))
  hf.eval()
  batch = grounded_batch(hf.config, [args.text_tokens] * args.batch)
  torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
  jax_batch = {k: jax.device_put(v) for k, v in batch.items()}

  graphdef, state = nnx.split(ours)

  @jax.jit
  def forward(state, batch):
    return nnx.merge(graphdef, state)(**batch).logits

  start = time.perf_counter()
  forward(state, jax_batch).block_until_ready()
  compile_s = time.perf_counter() - start

  def hf_forward():
    with torch.no_grad():
      return hf(**torch_batch).logits

  hf_forward()  # warm-up
  ours_s, hf_s = timed_pair(
    lambda: forward(state, jax_batch).block_until_ready(), hf_forward, args.repeats
  )

  mask = batch["attention_mask"].astype(bool)
  err = float(np.abs(np.asarray(forward(state, jax_batch)) - hf_forward().numpy())[mask].max())
  print(
    json.dumps(
      {
        "benchmark": "forward_vs_hf",
        "batch": args.batch,
        "sequence": int(batch["input_ids"].shape[1]),
        "text_tokens": args.text_tokens,
        "ours_s": round(ours_s, 4),
        "hf_s": round(hf_s, 4),
        "speedup": round(hf_s / ours_s, 2),
        "ours_compile_s": round(compile_s, 2),
        "max_abs_logit_diff": err,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": hf.config._attn_implementation,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": jax.devices()[0].device_kind,
      }
    )
  )


if __name__ == "__main__":
  main()
