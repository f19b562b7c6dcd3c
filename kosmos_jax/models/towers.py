"""More ViT image towers for SPHINX-style encoder mixes (sphinx_pandagpt.md 1.4).

`VisionTower` is one pre-LN ViT that a config turns into either of:
  DINOv2 (transformers' Dinov2Model): conv patches with bias, class token,
    learned positions, LayerScale on both residual branches, GELU or SwiGLU
    MLP, final `layernorm`. Output [b, 1 + grid², width] (class token first),
    SPHINX's `[x_norm_clstoken] + x_norm_patchtokens`.
  SigLIP (transformers' SiglipVisionModel, big_vision's `img` tower): conv
    patches with bias, no class token, tanh-GELU MLP, `post_layernorm`.
    Output [b, grid², width]; `pool` is the optional MAP head ([b, width]).
  ViT (transformers' ViTModel, big_vision's and google-research/
    vision_transformer's `vit.py`): conv patches with bias, a class token
    (none for big_vision's "gap"/"map" pooling), GELU MLP, final norm
    (`layernorm`, big_vision `Transformer/encoder_norm`). Output as DINOv2's.
  EVA (BLIP-2's EVA ViT-g/14, transformers' Blip2VisionModel): conv patches
    with bias, class token, learned positions with a class row, exact-GELU
    MLP, `post_layernorm` on every token. Output as DINOv2's (257 x 1408 at
    224 px), what BLIP-2's Q-Former reads. Its fused `qkv` projection (no key
    bias) loads into separate q/k/v projections (the key's bias as stored,
    zero in BLIP-2's releases): the same attention, so one block for all.

Any input whose sides are multiples of the patch size runs: when its grid is
not the position table's, the patch rows are resized bicubically, exactly as
transformers' `interpolate_pos_encoding` (DINOv2 always does; SigLIP, ViT and
EVA with `interpolate_pos_encoding=True`). Checkpoint loading is in
`kosmos_jax/checkpoints/towers.py`.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kosmos_jax.models import layers, vit


def gelu_tanh(x: jax.Array) -> jax.Array:
  # transformers' "gelu_pytorch_tanh" and flax's nn.gelu default (big_vision).
  return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


ACTIVATIONS = {**layers.ACTIVATIONS, "gelu_pytorch_tanh": gelu_tanh}

# Published shapes: width, depth, heads, mlp_dim (DINOv2's SwiGLU hidden width
# is already the rounded one of transformers' Dinov2SwiGLUFFN).
DINOV2_VARIANTS = {
  "S/14": dict(width=384, depth=12, heads=6, mlp_dim=1536),
  "B/14": dict(width=768, depth=12, heads=12, mlp_dim=3072),
  "L/14": dict(width=1024, depth=24, heads=16, mlp_dim=4096),
  "g/14": dict(width=1536, depth=40, heads=24, mlp_dim=4096, mlp="swiglu"),
}
SIGLIP_VARIANTS = {
  "B/16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16),
  "L/16": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch_size=16),
  "So400m/14": dict(width=1152, depth=27, heads=16, mlp_dim=4304, patch_size=14),
}

# big_vision's decode_variant (Table 2 of arXiv:2106.04560) with the usual patches.
VIT_VARIANTS = {
  "Ti/16": dict(width=192, depth=12, heads=3, mlp_dim=768, patch_size=16),
  "S/16": dict(width=384, depth=12, heads=6, mlp_dim=1536, patch_size=16),
  "B/16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16),
  "B/32": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=32),
  "L/16": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch_size=16),
  "L/14": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch_size=14),
}

# BLIP-2's vision encoder (transformers' Blip2VisionConfig defaults, the
# Salesforce/blip2-* releases): EVA-CLIP ViT-g/14 without its last block.
EVA_VARIANTS = {
  "g/14": dict(width=1408, depth=39, heads=16, mlp_dim=6144, patch_size=14),
}


def _config(base: dict, variant: dict, overrides: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({**base, **variant})
  for key, value in overrides.items():
    if key not in c:
      raise KeyError(f"unknown tower config key {key!r}")
    c[key] = value
  return c


def dinov2_config(variant: str = "g/14", **overrides) -> ml_collections.ConfigDict:
  """DINOv2 tower config (SPHINX uses g/14 at 224 px: 257 tokens of 1536)."""
  base = dict(
    kind="dinov2",
    image_size=224,
    patch_size=14,
    num_channels=3,
    mlp="gelu",  # "gelu" (exact), or "swiglu" (transformers' use_swiglu_ffn)
    layer_norm_eps=1e-6,
    layer_scale=1.0,  # LayerScale init (checkpoints overwrite it); None: no LayerScale
    class_token=True,
    position_grid=None,  # side of the position table's grid; None: image_size // patch_size
    head=False,
    channel_mix=True,  # models/mixing.py: False feeds a Q-Former only
  )
  return _config(base, DINOV2_VARIANTS[variant], overrides)


def siglip_config(variant: str = "So400m/14", **overrides) -> ml_collections.ConfigDict:
  """SigLIP image tower config; `head=True` adds the MAP pooling head."""
  base = dict(
    kind="siglip",
    image_size=224,
    num_channels=3,
    mlp="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    layer_scale=None,
    class_token=False,
    position_grid=None,
    head=False,
    channel_mix=True,
  )
  return _config(base, SIGLIP_VARIANTS[variant], overrides)


def vit_config(variant: str = "B/16", **overrides) -> ml_collections.ConfigDict:
  """Plain ViT tower config. The position table has a class-token row when
  class_token is set, as transformers' ViTModel; big_vision adds its table
  before prepending the class token (no such row), so its loader puts a zero
  row there: exact, and one layout for both sources (checkpoints/towers.py)."""
  base = dict(
    kind="vit",
    image_size=224,
    num_channels=3,
    # Exact GELU: transformers' ViTConfig; big_vision trained with flax's
    # tanh approximation, which vit_config_from_big_vision picks.
    mlp="gelu",
    layer_norm_eps=1e-6,  # flax's default (transformers' config.json: 1e-12)
    layer_scale=None,
    class_token=True,  # big_vision pool_type "tok"; False for "gap" / "map"
    position_grid=None,
    head=False,  # True: big_vision's MAP head ("map" pooling)
    channel_mix=True,
  )
  return _config(base, VIT_VARIANTS[variant], overrides)


def eva_config(variant: str = "g/14", **overrides) -> ml_collections.ConfigDict:
  """BLIP-2's EVA image tower config (g/14 at 224 px: 257 tokens of 1408).
  SPHINX feeds it to the Q-Former only: pass channel_mix=False there."""
  base = dict(
    kind="eva",
    image_size=224,
    num_channels=3,
    mlp="gelu",  # Blip2VisionConfig hidden_act: exact GELU
    layer_norm_eps=1e-6,  # Blip2VisionConfig's default, also post_layernorm's
    layer_scale=None,
    class_token=True,
    position_grid=None,
    head=False,
    channel_mix=True,
  )
  return _config(base, EVA_VARIANTS[variant], overrides)


def table_grid(cfg) -> int:
  return cfg.position_grid or cfg.image_size // cfg.patch_size


def resize_grid(table: jax.Array, src: int, h: int, w: int) -> jax.Array:
  """[src*src, d] grid rows -> [h*w, d] float32, torch's bicubic resize
  (align_corners=False) of the 2-D grid, as two constant matmuls."""
  mh = jnp.asarray(vit.bicubic_matrix(src, h), jnp.float32)
  mw = jnp.asarray(vit.bicubic_matrix(src, w), jnp.float32)
  grid = table.astype(jnp.float32).reshape(src, src, -1)
  # HIGHEST: TPUs would otherwise round the float32 operands to bfloat16.
  grid = jnp.einsum("ia,jb,abd->ijd", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
  return grid.reshape(h * w, -1)


class Mlp(nnx.Module):
  """fc2(act(fc1(x))), or SwiGLU down_proj(silu(gate_proj(x)) * up_proj(x))."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d, f = cfg.width, cfg.mlp_dim
    kw = dict(rngs=rngs, kernel_init=layers.normal(0.02), dtype=dtype, param_dtype=param_dtype)
    self.swiglu = cfg.mlp == "swiglu"
    if self.swiglu:
      self.gate_proj = layers.Dense(d, f, axes=("embed", "mlp"), **kw)
      self.up_proj = layers.Dense(d, f, axes=("embed", "mlp"), **kw)
      self.down_proj = layers.Dense(f, d, axes=("mlp", "embed"), **kw)
    else:
      if cfg.mlp not in ACTIVATIONS:
        raise ValueError(f"tower mlp {cfg.mlp!r} is not 'swiglu' or one of {sorted(ACTIVATIONS)}")
      self.fc1 = layers.Dense(d, f, axes=("embed", "mlp"), **kw)
      self.fc2 = layers.Dense(f, d, axes=("mlp", "embed"), **kw)
      self.activation = ACTIVATIONS[cfg.mlp]

  def __call__(self, x):
    if self.swiglu:
      return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
    return self.fc2(self.activation(self.fc1(x)))


class Block(nnx.Module):
  """x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x)) (ls: LayerScale, or 1)."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d = cfg.width
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    init = layers.normal(0.02)
    self.attn = layers.MultiHeadAttention(
      d, cfg.heads, rngs=rngs, qkv_init=init, out_init=init, **kw
    )
    self.norm2 = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    self.mlp = Mlp(cfg, rngs=rngs, **kw)
    scale = cfg.layer_scale
    make = lambda: layers.param(jnp.full((d,), scale, param_dtype), ("embed",))
    self.layer_scale1 = make() if scale is not None else None
    self.layer_scale2 = make() if scale is not None else None
    self.dtype = dtype

  def _scaled(self, y, scale):
    return y if scale is None else y * scale[...].astype(self.dtype)

  def __call__(self, x, *, implementation):
    y = self.attn(self.norm1(x), causal=False, implementation=implementation)
    x = x + self._scaled(y, self.layer_scale1)
    x = x + self._scaled(self.mlp(self.norm2(x)), self.layer_scale2)
    return layers.constrain(x, ("act_batch", "act_length", "act_embed"))


class MapHead(nnx.Module):
  """Multihead attention pooling: one learned probe attends over the tokens,
  then probe + mlp(norm(probe)). [b, l, d] -> [b, d]."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d = cfg.width
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    init = layers.normal(0.02)
    self.probe = layers.param(init(rngs.params(), (d,), param_dtype), ("embed",))
    self.attn = layers.MultiHeadAttention(
      d, cfg.heads, rngs=rngs, qkv_init=init, out_init=init, **kw
    )
    self.norm = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    self.mlp = Mlp(cfg, rngs=rngs, **kw)
    self.dtype = dtype

  def __call__(self, tokens):
    probe = jnp.broadcast_to(
      self.probe[...].astype(self.dtype), (tokens.shape[0], 1, tokens.shape[-1])
    )
    x = self.attn(probe, tokens, causal=False, implementation="xla")
    return (x + self.mlp(self.norm(x)))[:, 0]


class PatchEmbed(nnx.Module):
  """The stride-p conv with bias, kernel in Flax layout [kh, kw, in, out]
  (big_vision's `embedding/kernel`), run as a reshape + matmul: the same
  result, and cheaper."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.width
    kernel = layers.normal(0.02)(rngs.params(), (p, p, c, d), param_dtype)
    self.kernel = layers.param(kernel, (None, None, None, "embed"))
    self.bias = layers.param(jnp.zeros((d,), param_dtype), ("embed",))
    self.p, self.dtype = p, dtype

  def __call__(self, images):
    n, h, w, c = images.shape
    p = self.p
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (h // p) * (w // p), p * p * c).astype(self.dtype)
    kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
    return jnp.dot(x, kernel) + self.bias[...].astype(self.dtype)


class VisionTower(nnx.Module):
  """A DINOv2, SigLIP, ViT or EVA image tower (see the module doc); config
  from `dinov2_config` / `siglip_config` / `vit_config` / `eva_config` or the
  checkpoint readers."""

  def __init__(
    self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", attention="xla"
  ):
    d, grid = cfg.width, table_grid(cfg)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.patch_embedding = PatchEmbed(cfg, rngs=rngs, **kw)
    extra = 1 if cfg.class_token else 0
    self.cls_token = (
      layers.param(layers.normal(0.02)(rngs.params(), (d,), param_dtype), ("embed",))
      if cfg.class_token
      else None
    )
    self.position_embedding = layers.param(
      layers.normal(0.02)(rngs.params(), (extra + grid * grid, d), param_dtype), (None, "embed")
    )
    self.layers = layers.stacked(lambda r: Block(cfg, rngs=r, **kw), cfg.depth, rngs)
    self.norm = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    self.head = MapHead(cfg, rngs=rngs, **kw) if cfg.head else None
    self.cfg, self.dtype, self.remat, self.attention = cfg, dtype, remat, attention

  def _positions(self, h: int, w: int) -> jax.Array:
    table, grid = self.position_embedding[...], table_grid(self.cfg)
    if (h, w) == (grid, grid):
      return table  # a resize to the same grid is the identity
    if not self.cfg.class_token:
      return resize_grid(table, grid, h, w)
    return jnp.concatenate([table[:1].astype(jnp.float32), resize_grid(table[1:], grid, h, w)])

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [n, H, W, C] (NHWC, normalised; H, W multiples of the patch
    size) -> [n, (1 +) (H/p)(W/p), width] after the final norm."""
    n, h, w, c = images.shape
    p = self.cfg.patch_size
    if h % p or w % p or c != self.cfg.num_channels:
      raise ValueError(
        f"pixel_values of {h}x{w}x{c}: need sides that are multiples of the patch size "
        f"{p} and {self.cfg.num_channels} channels"
      )
    x = self.patch_embedding(images)
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self._positions(h // p, w // p).astype(self.dtype)
    body = lambda layer, y, _: layer(y, implementation=self.attention)
    x = layers.scan(self.layers, body, x, remat=self.remat, rng=None, num_layers=self.cfg.depth)
    return self.norm(x)

  def pool(self, tokens: jax.Array) -> jax.Array:
    """The MAP head's [n, width] of `__call__`'s tokens (SigLIP's pooler_output)."""
    if self.head is None:
      raise ValueError("this tower has no pooling head (config head=False)")
    return self.head(tokens)


def abstract_params(cfg) -> dict:
  """The tower's parameters as ShapeDtypeStructs (allocates nothing)."""
  return nnx.to_pure_dict(
    nnx.state(nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  )


def from_params(
  cfg, params: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, **kw
) -> VisionTower:
  """A tower holding `params` (nested dict of arrays, e.g. from the checkpoint
  readers), cast to param_dtype; **kw: remat, attention."""
  make = lambda: VisionTower(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **kw)
  graphdef, state = nnx.split(nnx.eval_shape(make))
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params))
  return nnx.merge(graphdef, state)
