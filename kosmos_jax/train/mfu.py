"""Model FLOPs per step and the devices' peak, for model-FLOPs utilisation (MFU).

MFU = model FLOPs per step / (step time x peak FLOP/s of all devices), with
model FLOPs counted analytically (matmuls only, 3x the forward pass for
forward + backward, no remat recompute, causal attention counted as half),
as MaxText reports it. SPHINX's extra towers and views count in full
(models/mixing.py, processing/views.py), frozen towers too: "3x" then
overstates a step whose frozen towers run forward only, as MFU conventions
for frozen encoders differ; resizing pictures is input preparation, not
counted.
"""

import time

import jax
import jax.numpy as jnp

from kosmos_jax.processing import views

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


def _vit(image_size, patch_size, channels, width, depth, mlp_dim, class_token=True, mlp_mats=2):
  """A pre-LN ViT: patch embedding, then per layer q/k/v/out, the MLP's
  matrices (3 for SwiGLU) and the attention scores and mix over n tokens."""
  patches = (image_size // patch_size) ** 2
  n = patches + class_token
  per_layer = 2 * n * (4 * width**2 + mlp_mats * width * mlp_dim) + 4 * n * n * width
  return 2 * patches * patch_size**2 * channels * width + depth * per_layer


def _convnext(c) -> float:
  """Stem, downsampling convs, and per block the 7x7 depthwise conv and the
  two 4x-wide pointwise layers."""
  side = c.image_size // c.patch_size
  total = 2 * side * side * c.patch_size**2 * c.num_channels * c.hidden_sizes[0]
  for stage, (depth, width) in enumerate(zip(c.depths, c.hidden_sizes)):
    if stage:
      side //= 2
      total += 2 * side * side * 4 * c.hidden_sizes[stage - 1] * width
    total += depth * 2 * side * side * (49 * width + 8 * width * width)
  return total


def _qformer(c, keys: int) -> float:
  """32 queries: self-attention and FFN in every layer, cross-attention over
  the `keys` image tokens (of width encoder_hidden_size) every
  `cross_attention_frequency` layers."""
  q, d = c.num_query_tokens, c.width
  per_layer = 2 * q * 4 * d * d + 4 * q * q * d + 4 * q * d * c.mlp_dim
  cross = 2 * q * 2 * d * d + 2 * keys * 2 * c.encoder_hidden_size * d + 4 * q * keys * d
  return c.depth * per_layer + -(-c.depth // c.cross_attention_frequency) * cross


def _towers(model_cfg, tokens: int) -> tuple[float, int]:
  """(FLOPs of SPHINX's extra towers and their mix projections for one view,
  the tokens the connector then reads) (models/mixing.py)."""
  towers = model_cfg.get("towers") or {}
  if not towers:
    return 0.0, tokens
  width, flops, channels, queries = model_cfg.text.width, 0.0, model_cfg.vision.width, 0
  for c in towers.values():
    mixed = c.get("channel_mix", True)
    if c.kind == "convnext":
      flops += _convnext(c)
      channels += c.hidden_sizes[-1] * mixed
    elif c.kind == "qformer":
      # Channel-mixed towers hand it CLIP's layout; one that only feeds it, its own tokens.
      source = towers.get(c.get("input", "clip"))
      keys = tokens
      if source is not None and not source.get("channel_mix", True):
        keys = (source.image_size // source.patch_size) ** 2 + source.get("class_token", False)
      flops += _qformer(c, keys) + 2 * c.num_query_tokens * c.width * width
      queries += c.num_query_tokens
    else:  # the ViT towers
      shape = (c.image_size, c.patch_size, c.num_channels, c.width, c.depth, c.mlp_dim)
      flops += _vit(*shape, c.get("class_token", False), 3 if c.get("mlp") == "swiglu" else 2)
      channels += c.width * mixed
  return flops + 2 * tokens * channels * width, tokens + queries


def forward_flops(model_cfg, seq_len: int, images_per_row: int) -> float:
  """Matmul FLOPs of one packed row's forward pass: every view of every
  picture through the towers and connector, then the decoder."""
  v, t = model_cfg.vision, model_cfg.text
  n = (v.image_size // v.patch_size) ** 2 + 1
  vit = _vit(v.image_size, v.patch_size, v.num_channels, v.width, v.depth, v.mlp_dim)
  towers, n_in = _towers(model_cfg, n)
  width_in = t.width if model_cfg.get("towers") else v.width
  q, kv, d = model_cfg.latent_query_num, n_in + model_cfg.latent_query_num, t.width
  connector = 2 * n_in * width_in * d + 2 * (2 * q + 2 * kv) * d * d + 4 * q * kv * d
  if model_cfg.get("connector", "kosmos2") == "perceiver":
    p = model_cfg.perceiver
    inner = p.heads * p.head_dim
    per_layer = 2 * (q + 2 * kv) * d * inner + 4 * q * kv * inner + 2 * q * inner * d
    per_layer += 4 * q * d * p.ffn_mult * d
    connector = 2 * n_in * width_in * d + p.depth * per_layer
  decoder = seq_len * (
    t.depth * (2 * (4 * d * d + 2 * d * t.ffn_dim) + 2 * seq_len * d) + 2 * d * t.vocab_size
  )
  return images_per_row * views.count(v) * (vit + towers + connector) + decoder


def model_flops_per_step(config) -> float:
  """Training FLOPs of one global batch: forward + backward = 3x forward."""
  return (
    3.0 * config.batch_size * forward_flops(config.model, config.seq_len, config.images_per_row)
  )


def peak_flops_of(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of one chip of this name (jax's device_kind or
  torch's device name), or None for one the table lacks (a CPU)."""
  kind = device_kind.lower()
  return next((peak for name, peak in _PEAK_BY_KIND if name in kind), None)


def peak_flops() -> float:
  """Peak FLOP/s of all devices; on CPU a float32 matmul measured now."""
  devices = jax.devices()
  peak = peak_flops_of(devices[0].device_kind)
  return _measured_matmul_flops() if peak is None else peak * len(devices)


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
