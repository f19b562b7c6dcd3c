"""ConvNeXt image tower (transformers' ConvNextModel; timm / open_clip's
`convnext_*` trunks), the convolutional encoder of SPHINX's mix
(sphinx_pandagpt.md 1.4). NHWC throughout.

  stem    4x4 stride-4 conv, LayerNorm over channels
  stages  (stages 2..4 first: LayerNorm, 2x2 stride-2 conv) then blocks of
          x + gamma * pwconv2(gelu(pwconv1(norm(dwconv7x7(x)))))
  norm    the final LayerNorm: transformers applies it to the pooled mean
          (`pool`); timm's head applies it at every position when its
          pooling is removed, which is what SPHINX feeds on (`norm_map`).

`__call__` gives the last stage's map [b, h, w, C] (transformers'
`last_hidden_state`, or with cfg.norm_map the per-position normed map);
`tokens` lays it out as SPHINX does: a mean token, then the map resized to
CLIP's grid. Checkpoint loading is in `kosmos_jax/checkpoints/convnext.py`.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kosmos_jax.models import layers

# (depths, hidden_sizes): transformers' facebook/convnext-* shapes, and
# open_clip's convnext_xxlarge (SPHINX's), which timm builds with eps 1e-5 in
# every norm and open_clip trains at 256 px (an 8x8 map).
VARIANTS = {
  "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
  "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
  "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
  "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
  "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
  "xxlarge": ((3, 4, 30, 3), (384, 768, 1536, 3072)),
}
_XXLARGE = dict(image_size=256, layer_norm_eps=1e-5, head_norm_eps=1e-5, norm_map=True)


def convnext_config(variant: str = "xxlarge", **overrides) -> ml_collections.ConfigDict:
  """ConvNeXt tower config; the xxlarge preset is SPHINX's open_clip trunk."""
  depths, sizes = VARIANTS[variant]
  c = ml_collections.ConfigDict(
    dict(
      kind="convnext",
      depths=depths,
      hidden_sizes=sizes,
      image_size=224,
      num_channels=3,
      patch_size=4,
      activation="gelu",
      # transformers hardwires 1e-6 in the stem, downsampling and block norms;
      # its config's layer_norm_eps is the final norm's (head_norm_eps here).
      layer_norm_eps=1e-6,
      head_norm_eps=1e-12,
      layer_scale_init=1e-6,  # <= 0: no layer scale (transformers' convention)
      drop_path=0.0,  # training-time stochastic depth: ignored, this tower is inference-only
      norm_map=False,  # apply the final norm at every position of __call__'s map
    )
  )
  if variant == "xxlarge":
    c.update(_XXLARGE)
  for key, value in overrides.items():
    if key not in c:
      raise KeyError(f"unknown convnext config key {key!r}")
    c[key] = value
  if len(c.depths) != len(c.hidden_sizes):
    raise ValueError(
      f"convnext depths {c.depths} and hidden_sizes {c.hidden_sizes} differ in length"
    )
  return c


def patch_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, p: int) -> jax.Array:
  """A stride-p, p x p conv (kernel [p, p, in, out]) as reshape + matmul;
  like torch, rows and columns past the last whole patch are dropped."""
  n, h, w, c = x.shape
  x = x[:, : h // p * p, : w // p * p]
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(n, h // p, w // p, p * p * c)
  return jnp.dot(x, kernel.reshape(p * p * c, -1).astype(x.dtype)) + bias.astype(x.dtype)


def _norm(width, cfg, kw, eps=None):
  return layers.LayerNorm(
    width, axis_name="embed", eps=cfg.layer_norm_eps if eps is None else eps, **kw
  )


class Block(nnx.Module):
  """x + gamma * pwconv2(act(pwconv1(norm(dwconv(x))))), x [b, h, w, d]."""

  def __init__(self, cfg, width, *, rngs, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    init = layers.normal(0.02)
    self.dwconv_kernel = layers.param(
      init(rngs.params(), (7, 7, 1, width), param_dtype), (None, None, None, "embed")
    )
    self.dwconv_bias = layers.param(jnp.zeros((width,), param_dtype), ("embed",))
    self.norm = _norm(width, cfg, kw)
    dense = dict(rngs=rngs, kernel_init=init, **kw)
    self.pwconv1 = layers.Dense(width, 4 * width, axes=("embed", "mlp"), **dense)
    self.pwconv2 = layers.Dense(4 * width, width, axes=("mlp", "embed"), **dense)
    scale = cfg.layer_scale_init
    self.gamma = (
      layers.param(jnp.full((width,), scale, param_dtype), ("embed",)) if scale > 0 else None
    )
    self.activation = layers.ACTIVATIONS[cfg.activation]
    self.dtype = dtype

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(
      x,
      self.dwconv_kernel[...].astype(self.dtype),
      window_strides=(1, 1),
      padding=((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],  # depthwise: one 7x7 filter per channel
    )
    y = self.pwconv2(
      self.activation(self.pwconv1(self.norm(y + self.dwconv_bias[...].astype(self.dtype))))
    )
    if self.gamma is not None:
      y = y * self.gamma[...].astype(self.dtype)
    return x + y.astype(x.dtype)


class Stage(nnx.Module):
  """Optional downsampling (norm, 2x2 stride-2 conv), then stacked blocks."""

  def __init__(self, cfg, index, *, rngs, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    width, depth = cfg.hidden_sizes[index], cfg.depths[index]
    if index > 0:
      prev = cfg.hidden_sizes[index - 1]
      self.downsample_norm = _norm(prev, cfg, kw)
      kernel = layers.normal(0.02)(rngs.params(), (2, 2, prev, width), param_dtype)
      self.downsample_kernel = layers.param(kernel, (None, None, None, "embed"))
      self.downsample_bias = layers.param(jnp.zeros((width,), param_dtype), ("embed",))
    else:  # the stem already gives hidden_sizes[0] channels at stride 4
      self.downsample_norm = None
    self.blocks = layers.stacked(lambda r: Block(cfg, width, rngs=r, **kw), depth, rngs)
    self.depth = depth

  def __call__(self, x, *, remat):
    if self.downsample_norm is not None:
      x = patch_conv(
        self.downsample_norm(x), self.downsample_kernel[...], self.downsample_bias[...], 2
      )
    return layers.scan(
      self.blocks, lambda b, y, _: b(y), x, remat=remat, rng=None, num_layers=self.depth
    )


class ConvNeXt(nnx.Module):
  """A ConvNeXt tower (module doc); config from `convnext_config` or the
  checkpoint reader."""

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, remat="none"):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_sizes[0]
    kernel = layers.normal(0.02)(rngs.params(), (p, p, c, d), param_dtype)
    self.stem_kernel = layers.param(kernel, (None, None, None, "embed"))
    self.stem_bias = layers.param(jnp.zeros((d,), param_dtype), ("embed",))
    self.stem_norm = _norm(d, cfg, kw)
    self.stages = nnx.List([Stage(cfg, i, rngs=rngs, **kw) for i in range(len(cfg.depths))])
    self.norm = _norm(cfg.hidden_sizes[-1], cfg, kw, eps=cfg.head_norm_eps)
    self.cfg, self.dtype, self.remat = cfg, dtype, remat

  def features(self, images: jax.Array) -> jax.Array:
    """images [n, H, W, C] (NHWC, normalised) -> the last stage's map
    [n, H/s, W/s, hidden_sizes[-1]], s = patch_size * 2^(stages - 1), before
    any final norm (transformers' last_hidden_state)."""
    n, h, w, c = images.shape
    stride = self.cfg.patch_size * 2 ** (len(self.cfg.depths) - 1)
    if c != self.cfg.num_channels or min(h, w) < stride:
      raise ValueError(
        f"pixel_values of {h}x{w}x{c}: need {self.cfg.num_channels} channels and sides of "
        f"at least {stride}"
      )
    x = patch_conv(
      images.astype(self.dtype), self.stem_kernel[...], self.stem_bias[...], self.cfg.patch_size
    )
    x = self.stem_norm(x)
    for stage in self.stages:
      x = stage(x, remat=self.remat)
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    """`features`, normed at every position when cfg.norm_map (SPHINX's map)."""
    x = self.features(images)
    return self.norm(x) if self.cfg.norm_map else x

  def pool(self, feature_map: jax.Array) -> jax.Array:
    """norm(mean over positions) of `features`' map: transformers' pooler_output [n, C]."""
    return self.norm(feature_map.astype(jnp.float32).mean(axis=(1, 2)))

  def tokens(self, images: jax.Array, grid: int) -> jax.Array:
    """SPHINX's ConvNeXt tokens: `grid_tokens(self(images), grid)`."""
    return grid_tokens(self(images), grid)


def grid_tokens(feature_map: jax.Array, grid: int) -> jax.Array:
  """[n, h, w, C] -> [n, 1 + grid², C]: the map resized to grid x grid
  (nearest, torch's rule: source index floor(i * h / grid), so 8 -> 16 is
  SPHINX's repeat_interleave(2)), flattened row-major, after its mean token
  (taken over the resized grid, as SPHINX does: CLIP's class-token slot)."""
  n, h, w, c = feature_map.shape
  rows = (jnp.arange(grid) * h) // grid
  cols = (jnp.arange(grid) * w) // grid
  x = feature_map[:, rows][:, :, cols].reshape(n, grid * grid, c)
  mean = x.astype(jnp.float32).mean(axis=1, keepdims=True).astype(x.dtype)
  return jnp.concatenate([mean, x], axis=1)


def abstract_params(cfg) -> dict:
  """The tower's parameters as ShapeDtypeStructs (allocates nothing)."""
  return nnx.to_pure_dict(
    nnx.state(nnx.eval_shape(lambda: ConvNeXt(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  )


def from_params(cfg, params: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, **kw) -> ConvNeXt:
  """A tower holding `params` (nested dict of arrays, e.g. from the checkpoint
  reader), cast to param_dtype; **kw: remat."""
  make = lambda: ConvNeXt(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **kw)
  graphdef, state = nnx.split(nnx.eval_shape(make))
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params))
  return nnx.merge(graphdef, state)
