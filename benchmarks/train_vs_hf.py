"""Train step: ours (jit, AdamW) vs transformers' Kosmos-2 with torch AdamW, same shape and batch.

Prints one JSON line: tokens/s of both, and our MFU. Dropout is off on both
sides (so the work is the same); both use float32.
Run: `.venv/bin/python -m benchmarks.train_vs_hf`.
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from kosmos_jax import heap  # pylint: disable=g-import-not-at-top

# Both sides alike: glibc keeps freed memory (kosmos_jax/heap.py says why).
heap.keep_freed_memory()

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import torch
import transformers
from flax import nnx

from benchmarks.common import MID_HF_CONFIG, feature_batch, same_weights, timed_pair
from kosmos_jax.config import experiment_config
from kosmos_jax.train import mfu, optim
from kosmos_jax.train import state as state_lib
from kosmos_jax.train import step as step_lib
from tests.helpers.hf_reference import grounded_batch


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--text-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  config = transformers.Kosmos2Config(**MID_HF_CONFIG)
  config.text_config.dropout = config.text_config.attention_dropout = 0.0
  hf, ours = same_weights(config)
  hf.train()
  batch = grounded_batch(hf.config, [args.text_tokens] * args.batch)
  tokens = int(batch["attention_mask"].sum())

  # transformers: labels are the ids with prompt-free loss everywhere but pads and slots.
  labels = np.where(
    (batch["attention_mask"] == 1) & (batch["image_embeds_position_mask"] == 0),
    batch["input_ids"],
    -100,
  )
  torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
  torch_labels = torch.from_numpy(labels)
  opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)

  def hf_step():
    opt.zero_grad(set_to_none=True)
    loss = hf(**torch_batch, labels=torch_labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 2.0)
    opt.step()
    return loss.detach().item()

  cfg = experiment_config(ours.config.as_configdict())
  tx = optim.optimizer(cfg.optim, 1000)
  state = state_lib.create(nnx.state(ours, nnx.Param), tx, seed=0)
  train_step = jax.jit(step_lib.make_train_step(nnx.graphdef(ours), tx), donate_argnums=0)
  jax_batch = jax.device_put(feature_batch(batch))
  holder = [state]

  def our_step():
    holder[0], metrics = train_step(holder[0], jax_batch)
    return float(metrics["loss"])

  # Two untimed steps each: the first of ours compiles, and the heap of the
  # process grows to its working size over the first two steps of either side.
  for _ in range(2):
    our_step()
    hf_step()
  ours_s, hf_s = timed_pair(our_step, hf_step, args.repeats)

  cfg.batch_size, cfg.seq_len, cfg.images_per_row = args.batch, batch["input_ids"].shape[1], 1
  flops = mfu.model_flops_per_step(cfg)
  peak = mfu.peak_flops()
  print(
    json.dumps(
      {
        "benchmark": "train_vs_hf",
        "batch": args.batch,
        "sequence": cfg.seq_len,
        "ours_tokens_per_s": round(tokens / ours_s, 1),
        "hf_tokens_per_s": round(tokens / hf_s, 1),
        "speedup": round(hf_s / ours_s, 2),
        "ours_step_s": round(ours_s, 3),
        "hf_step_s": round(hf_s, 3),
        "ours_mfu": round(flops / (ours_s * peak), 4),
        "peak_flops_measured": round(peak / 1e9, 1),
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
      }
    )
  )


if __name__ == "__main__":
  main()
