"""Model FLOPs per step and the devices' peak, for model-FLOPs utilisation (MFU).

MFU = model FLOPs per step / (step time x peak FLOP/s of all devices), with
model FLOPs counted analytically (matmuls only, 3x the forward pass for
forward + backward, no remat recompute, causal attention counted as half),
as MaxText reports it.
"""

import time

import jax
import jax.numpy as jnp

# bf16 dense peak per chip, FLOP/s (vendor figures, as MaxText uses them).
_PEAK_BY_KIND = (
  ("v6 lite", 918e12),
  ("v6e", 918e12),
  ("v5 lite", 197e12),
  ("v5e", 197e12),
  ("v5p", 459e12),
  ("v5", 459e12),
  ("v4", 275e12),
  ("h200", 989e12),
  ("h100", 989e12),
  ("a100", 312e12),
)


def forward_flops(model_cfg, seq_len: int, images_per_row: int) -> float:
  """Matmul FLOPs of one packed row's forward pass."""
  v, t = model_cfg.vision, model_cfg.text
  patches = (v.image_size // v.patch_size) ** 2
  n = patches + 1
  vit = 2 * patches * v.patch_size**2 * v.num_channels * v.width + v.depth * (
    2 * n * (4 * v.width**2 + 2 * v.width * v.mlp_dim) + 4 * n * n * v.width
  )
  q, kv, d = model_cfg.latent_query_num, n + model_cfg.latent_query_num, t.width
  connector = 2 * n * v.width * d + 2 * (2 * q + 2 * kv) * d * d + 4 * q * kv * d
  if model_cfg.get("connector", "kosmos2") == "perceiver":
    p = model_cfg.perceiver
    inner = p.heads * p.head_dim
    per_layer = 2 * (q + 2 * kv) * d * inner + 4 * q * kv * inner + 2 * q * inner * d
    per_layer += 4 * q * d * p.ffn_mult * d
    connector = 2 * n * v.width * d + p.depth * per_layer
  decoder = seq_len * (
    t.depth * (2 * (4 * d * d + 2 * d * t.ffn_dim) + 2 * seq_len * d) + 2 * d * t.vocab_size
  )
  return images_per_row * (vit + connector) + decoder


def model_flops_per_step(config) -> float:
  """Training FLOPs of one global batch: forward + backward = 3x forward."""
  return (
    3.0 * config.batch_size * forward_flops(config.model, config.seq_len, config.images_per_row)
  )


def peak_flops() -> float:
  """Peak FLOP/s of all devices; on CPU a float32 matmul measured now."""
  devices = jax.devices()
  kind = devices[0].device_kind.lower()
  for name, peak in _PEAK_BY_KIND:
    if name in kind:
      return peak * len(devices)
  return _measured_matmul_flops()


def _measured_matmul_flops(n: int = 1024, repeats: int = 5, rounds: int = 5) -> float:
  # One large matmul uses every core XLA's CPU backend has. The best of a few
  # short rounds: a peak is what the cores reach when nothing interrupts them,
  # and a single ~30 ms round swings by 25% with whatever else the host runs.
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    b = a
    for _ in range(repeats):
      b = matmul(b)
    b.block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 * repeats / best
