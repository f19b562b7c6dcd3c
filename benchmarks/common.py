"""Shared by the benchmarks: the mid-size Kosmos-2 shape, a timer, a steady heap."""
import os
import statistics
import sys
import tempfile
import time

# glibc gives each thread its own arena and hands every freed block over 32 MB
# back to the kernel, so each step of either framework faults its large
# buffers in again: ~700k page faults and ~1.2 s of system time per train step
# of ours, ~600k of transformers', and the kernel's cost for them swings with
# whatever ran just before (the other framework's step). One arena that keeps
# freed memory takes the faults out of both sides' timings.
STEADY_HEAP = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
               "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def steady_heap():
  """Re-runs this script under STEADY_HEAP, unless it already runs under it.
  Call before anything starts a thread (before importing jax or torch)."""
  if any(os.environ.get(k) != v for k, v in STEADY_HEAP.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_HEAP})

# Mid-size Kosmos-2: 6 x 512 decoder, 6-layer ViT of width 384 at 224/14, the
# released vocabulary and 64 latents (transformers Kosmos2Config keywords).
MID_HF_CONFIG = dict(
    text_config=dict(embed_dim=512, layers=6, attention_heads=8, ffn_dim=2048,
                     vocab_size=65037, max_position_embeddings=2048),
    vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=6, image_size=224, patch_size=14),
    latent_query_num=64)


def timed_pair(ours, theirs, repeats: int) -> tuple[float, float]:
  """Median wall times of `ours()` and `theirs()` (each must block until done).

  Calls alternate, so a load that comes and goes on the machine hits both alike.
  """
  times = ([], [])
  for _ in range(repeats):
    for fn, out in zip((ours, theirs), times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return statistics.median(times[0]), statistics.median(times[1])


def same_weights(config):
  """(transformers model, our model) holding the same random weights for `config`
  (a transformers Kosmos2Config), ours loaded through its safetensors snapshot."""
  import kosmos_jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf = transformers.Kosmos2ForConditionalGeneration(config)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    return hf, kosmos_jax.from_pretrained(d)
