"""CLIP ViT image encoder as used by Kosmos-2 (reference/kosmos2.md 1.3).

Higher input resolution (microsoft/unilm #1266): the learned position table
keeps its patch grid (`position_grid`), so released weights load unchanged;
when `image_size` gives another grid, the patch rows are resized bicubically
at forward time, as transformers' `interpolate_pos_encoding=True` does.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kosmos_jax.models import layers

# torch's bicubic kernel (Keys, a = -0.75); jax.image.resize's uses a = -0.5.
_CUBIC_A = -0.75


def position_grid(cfg) -> int:
  """Side of the position table's patch grid: `vision.position_grid` when set
  (a checkpoint's table run at another `image_size`), else image_size's grid."""
  return cfg.get("position_grid") or cfg.image_size // cfg.patch_size


def bicubic_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] float64 M: M @ x resizes x along one axis exactly as torch's
  `interpolate(size=dst, mode="bicubic", align_corners=False)` (no antialias).

  Output i reads source coordinate (i + 0.5) * src / dst - 0.5 from the taps
  floor - 1 .. floor + 2; a tap past the border reads the edge row instead, so
  its weight adds to the edge row's.
  """
  a = _CUBIC_A
  x = (np.arange(dst) + 0.5) * (src / dst) - 0.5
  base = np.minimum(np.floor(x), src - 1)
  t = np.clip(x - base, 0.0, 1.0)
  near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
  far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  taps = np.clip(base.astype(int)[:, None] + np.arange(-1, 3), 0, src - 1)
  matrix = np.zeros((dst, src))
  np.add.at(matrix, (np.repeat(np.arange(dst), 4), taps.ravel()), weights.ravel())
  return matrix


def resize_positions(table: jax.Array, src: int, dst: int) -> jax.Array:
  """[1 + src*src, d] position table -> [1 + dst*dst, d] float32: the class row
  kept, the patch rows resized bicubically on their 2-D grid.

  Two constant matrices (one per axis) make it two small matmuls inside jit.
  """
  m = jnp.asarray(bicubic_matrix(src, dst), jnp.float32)
  table = table.astype(jnp.float32)
  patches = table[1:].reshape(src, src, -1)
  # HIGHEST: TPUs would otherwise round the float32 operands to bfloat16.
  patches = jnp.einsum("ia,jb,abd->ijd", m, m, patches, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([table[:1], patches.reshape(dst * dst, -1)])


class VisionBlock(nnx.Module):
  """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d, depth = cfg.width, cfg.depth
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    # Hugging Face's CLIP init, so that fresh models train like theirs.
    in_std = d**-0.5 * (2 * depth) ** -0.5
    self.layer_norm1 = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    self.self_attn = layers.MultiHeadAttention(
      d, cfg.heads, rngs=rngs, qkv_init=layers.normal(in_std), out_init=layers.normal(d**-0.5), **kw
    )
    self.layer_norm2 = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    self.fc1 = layers.Dense(
      d,
      cfg.mlp_dim,
      axes=("embed", "mlp"),
      rngs=rngs,
      kernel_init=layers.normal((2 * d) ** -0.5),
      **kw,
    )
    self.fc2 = layers.Dense(
      cfg.mlp_dim, d, axes=("mlp", "embed"), rngs=rngs, kernel_init=layers.normal(in_std), **kw
    )
    self.activation = layers.ACTIVATIONS[cfg.activation]
    self.attention_dropout = cfg.attention_dropout

  def __call__(self, x, rng, *, implementation):
    x = x + self.self_attn(
      self.layer_norm1(x),
      causal=False,
      implementation=implementation,
      dropout_rate=self.attention_dropout,
      dropout_rng=rng,
    )
    x = x + self.fc2(self.activation(self.fc1(self.layer_norm2(x))))
    return layers.constrain(x, ("act_batch", "act_length", "act_embed"))


class VisionTransformer(nnx.Module):
  """Patch embedding + class token + learned positions + pre-LN encoder.

  Returns the last hidden states of all tokens *before* post_layernorm, like
  Hugging Face's `last_hidden_state`; `post_layernorm` is applied by the caller.
  """

  def __init__(self, cfg, *, rngs, dtype, param_dtype, remat, attention):
    d, p = cfg.width, cfg.patch_size
    grid = position_grid(cfg)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    # Conv kernel in Flax layout [kh, kw, in, out]; the conv has no bias.
    self.patch_embedding = layers.param(
      layers.normal(0.02)(rngs.params(), (p, p, cfg.num_channels, d), param_dtype),
      (None, None, None, "embed"),
    )
    self.class_embedding = layers.param(
      layers.normal(d**-0.5)(rngs.params(), (d,), param_dtype), ("embed",)
    )
    # .get: configs saved before this init-only key restore unchanged.
    position_init = cfg.get("position_init", "normal")
    if position_init == "sincos2d":
      table = jnp.concatenate([jnp.zeros((1, d)), layers.sincos2d(grid, d)]).astype(param_dtype)
    elif position_init == "normal":
      table = layers.normal(0.02)(rngs.params(), (grid * grid + 1, d), param_dtype)
    else:
      raise ValueError(f"vision.position_init {position_init!r}: expected 'normal' or 'sincos2d'")
    self.position_embedding = layers.param(table, (None, "embed"))
    self.pre_layrnorm = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    self.layers = layers.stacked(lambda r: VisionBlock(cfg, rngs=r, **kw), cfg.depth, rngs)
    self.post_layernorm = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    self.cfg, self.dtype, self.remat, self.attention = cfg, dtype, remat, attention

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """images [n, H, W, C] (NHWC, normalised) -> [n, 1 + patches, width]."""
    n, h, w, c = images.shape
    p, size = self.cfg.patch_size, self.cfg.image_size
    if (h, w) != (size, size) or c != self.cfg.num_channels:
      raise ValueError(
        f"pixel_values of {h}x{w}x{c} do not match the model's "
        f"{size}x{size}x{self.cfg.num_channels} input"
      )
    # Patchify as a reshape + matmul: the same as a stride-p conv, and cheaper.
    patches = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, (h // p) * (w // p), p * p * c).astype(self.dtype)
    kernel = self.patch_embedding[...].reshape(p * p * c, -1).astype(self.dtype)
    x = jnp.dot(patches, kernel)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, x.shape[-1]))
    positions, table_grid = self.position_embedding[...], position_grid(self.cfg)
    if h // p != table_grid:
      positions = resize_positions(positions, table_grid, h // p)
    x = jnp.concatenate([cls, x], axis=1) + positions.astype(self.dtype)
    x = self.pre_layrnorm(x)
    body = lambda layer, y, r: layer(y, r, implementation=self.attention)
    return layers.scan(self.layers, body, x, remat=self.remat, rng=rng, num_layers=self.cfg.depth)
