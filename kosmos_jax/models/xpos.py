"""xPos relative positions, KOSMOS-1's decoder positions (`text.position="xpos"`).

Sun et al. 2022, "A Length-Extrapolatable Transformer", as torchscale's XPOS
component computes it. Per head of width d, pair i = 0 .. d/2 - 1 of the
interleaved dimensions (2i, 2i + 1) is rotated by the angle n * theta_i,
theta_i = 10000^(-i / (d/2)) (RoPE's frequencies), and multiplied by
zeta_i^(+n / B) in queries and zeta_i^(-n / B) in keys, with
zeta_i = (2i + 0.4 d) / (1.4 d) and B = 512. A query at n and a key at m then
meet as zeta^((n - m) / B) R((m - n) theta): relative, decaying with distance.

The exponent is taken from n - center rather than n. That changes nothing in
q . k (the offsets cancel) but bounds the factors: torchscale centres on the
current length, which a KV cache cannot do (its keys are stored rotated and
scaled, so their factors must not depend on how long the sequence grows).
The decoder uses a fixed center = max_positions // 2: positions 0 .. 2048
give factors within zeta_0^(+-2) = [0.082, 12.3] and float32 (or bfloat16,
same exponent range) overflows only beyond |n - center| ~ 36,000 positions.
"""

import jax
import jax.numpy as jnp

SCALE_BASE = 512.0
ROTARY_BASE = 10000.0


def rotate(x: jax.Array, positions: jax.Array, *, downscale: bool, center: int) -> jax.Array:
  """x [b, l, heads, d] at positions [b, l] (or [1, l]) -> rotated and scaled x.

  downscale=False for queries (zeta^(+n/B)), True for keys (zeta^(-n/B)).
  Computed in float32, returned in x's dtype.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"xPos needs an even head width, got {d}")
  i = jnp.arange(d // 2, dtype=jnp.float32)
  pos = positions.astype(jnp.float32)[..., None, None]  # [b, l, 1, 1]: all heads alike
  angles = pos * ROTARY_BASE ** (-i / (d // 2))
  zeta = (2.0 * i + 0.4 * d) / (1.4 * d)
  exponent = (pos - center) / SCALE_BASE
  scale = zeta ** (-exponent if downscale else exponent)
  cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
  x32 = x.astype(jnp.float32)
  even, odd = x32[..., 0::2], x32[..., 1::2]
  # torchscale's rotate_every_two: (x_2i, x_2i+1) -> (-x_2i+1, x_2i), so the
  # pair turns by +angle; the halves layout of other RoPEs would differ.
  out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
