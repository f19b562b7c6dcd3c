"""Shared by the benchmarks: the mid-size Kosmos-2 shape and a timer."""

import statistics
import tempfile
import time

# Mid-size Kosmos-2: 6 x 512 decoder, 6-layer ViT of width 384 at 224/14, the
# released vocabulary and 64 latents (transformers Kosmos2Config keywords).
MID_HF_CONFIG = dict(
  text_config=dict(
    embed_dim=512,
    layers=6,
    attention_heads=8,
    ffn_dim=2048,
    vocab_size=65037,
    max_position_embeddings=2048,
  ),
  vision_config=dict(
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    image_size=224,
    patch_size=14,
  ),
  latent_query_num=64,
)

# Seconds-long shapes for tests/test_benchmarks.py; the vocabulary still
# covers the tiny sentencepiece model's 2,037 ids.
TINY_HF_CONFIG = dict(
  text_config=dict(
    embed_dim=32,
    layers=1,
    attention_heads=2,
    ffn_dim=64,
    vocab_size=2100,
    max_position_embeddings=256,
  ),
  vision_config=dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
  ),
  latent_query_num=8,
)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
  """Median wall time of `fn()` (which must block until done) over `repeats`
  calls, and every call's time."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


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


def feature_batch(batch: dict) -> dict:
  """An HF-style batch (tests/helpers/hf_reference.grounded_batch) in the
  feature converter's layout: next-token targets, loss on every real target
  but the image slots, segment ids from the attention mask."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  ids, mask, slots = (
    batch["input_ids"],
    batch["attention_mask"],
    batch["image_embeds_position_mask"],
  )
  targets = np.concatenate([ids[:, 1:], np.ones_like(ids[:, :1])], axis=1)
  weights = np.concatenate([mask[:, 1:] * (1 - slots[:, 1:]), np.zeros_like(ids[:, :1])], axis=1)
  return dict(
    input_ids=ids.astype(np.int32),
    targets=targets.astype(np.int32),
    loss_weights=weights.astype(np.float32),
    segment_ids=mask.astype(np.int32),
    image_embeds_position_mask=slots.astype(np.int32),
    pixel_values=batch["pixel_values"][:, None],
  )


def same_weights(config):
  """(transformers model, our model) holding the same random weights for `config`
  (a transformers Kosmos2Config), ours loaded through its safetensors snapshot."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  import kosmos_jax  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  hf = transformers.Kosmos2ForConditionalGeneration(config)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    return hf, kosmos_jax.from_pretrained(d)


def models_and_processor(tiny: bool):
  """(transformers model in eval mode, our model, processor) at the tiny or
  mid-size shape, the processor on the tiny sentencepiece vocabulary (2,037
  ids, all inside both shapes' vocabularies)."""
  import transformers  # pylint: disable=g-import-not-at-top

  from kosmos_jax.eval import rec  # pylint: disable=g-import-not-at-top
  from kosmos_jax.processing import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  from tests.helpers import spm  # pylint: disable=g-import-not-at-top

  transformers.logging.set_verbosity_error()
  hf, ours = same_weights(transformers.Kosmos2Config(**(TINY_HF_CONFIG if tiny else MID_HF_CONFIG)))
  hf.eval()
  with tempfile.TemporaryDirectory() as d:
    vocab = vocab_lib.KosmosVocabulary(spm.train_tiny_spm(d), num_patches_per_side=32)
  return hf, ours, rec.processor_for(vocab, ours.config)


def run_record() -> dict:
  """What every "ours vs transformers" line reports about the run's machine and stack."""
  import os  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from kosmos_jax.train import mfu  # pylint: disable=g-import-not-at-top

  return {
    "matmul_peak_gflops": round(mfu.peak_flops() / 1e9, 1),
    "torch_threads": torch.get_num_threads(),
    "cpu_load_1min": round(os.getloadavg()[0], 2),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "device": jax.devices()[0].device_kind,
  }
