"""Building blocks shared by the vision tower, the connector and the decoder.

Every parameter carries logical axis names in its `out_sharding` metadata
(e.g. ('embed', 'mlp')); the mesh rules that turn them into PartitionSpecs live
in the training config, so nothing here knows about devices.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kosmos_jax.models import attention, xpos
from kosmos_jax.sharding import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def normal(std: float) -> Initializer:
  return nnx.initializers.normal(stddev=std)


def sincos2d(grid: int, width: int, temperature: float = 10_000.0) -> jax.Array:
  """[grid * grid, width] table of 2-D positions, row-major like the ViT's
  patches and the location tokens: sin and cos of x, then of y, each over
  width / 4 geometric frequencies, unit amplitude. The from-scratch init of
  the ViT position table and of the location-token embeddings."""
  if width % 4:
    raise ValueError(f"sincos2d needs a width divisible by 4, got {width}")
  omega = temperature ** -(jnp.arange(width // 4) / (width // 4))
  y, x = jnp.mgrid[:grid, :grid]
  x = x.reshape(-1, 1) * omega
  y = y.reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
  # Logical names are metadata only: the trainer applies a mesh through the
  # config's rules, never eagerly when a parameter is created.
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel stored [in, out] (a torch Linear's transpose)."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    rngs: nnx.Rngs,
    kernel_init: Initializer,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    self.kernel = param(kernel_init(rngs.params(), (in_features, out_features), param_dtype), axes)
    self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


# Normalisation and activation keep their statistics in float32 but save only
# their input for the backward pass. Autodiff of the float32 formulas saves
# float32 copies of every intermediate: at the released size (batch 8 x 2048,
# bf16, remat none) those were 99 of the 132 GiB of saved activations, six
# float32 [8, 2048, 8192] arrays per layer from the FFN's sub-LayerNorm and its
# GELU alone (benchmarks/memory.py). The backward passes recompute them from
# the saved (bfloat16) input and two float32 row statistics.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype) -> jax.Array:
  """LayerNorm over the last axis, statistics in float32, output in `dtype`."""
  return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
  y = (x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, dtype, residuals, g):
  del eps, dtype
  x, mean, rstd, scale, bias = residuals
  g = g.astype(jnp.float32)
  normed = (x.astype(jnp.float32) - mean) * rstd
  gs = g * scale.astype(jnp.float32)
  dx = rstd * (gs - gs.mean(-1, keepdims=True) - normed * (gs * normed).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return (
    dx.astype(x.dtype),
    (g * normed).sum(rows).astype(scale.dtype),
    g.sum(rows).astype(bias.dtype),
  )


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm whose statistics are always computed in float32 (`layer_norm`)."""

  def __init__(
    self,
    features: int,
    *,
    axis_name: str | None,
    eps: float,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    self.scale = param(jnp.ones((features,), param_dtype), (axis_name,))
    self.bias = param(jnp.zeros((features,), param_dtype), (axis_name,))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps, self.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; `rng=None` means inference (deterministic)."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
  # torchscale computes the activation in float32; jax.nn.gelu defaults to tanh.
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def _gelu_fwd(x):
  return gelu_exact(x), x


def _gelu_bwd(x, g):
  # d/dx x * Phi(x) = Phi(x) + x * phi(x), in float32 from the saved input.
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * 2**-0.5))
  pdf = jnp.exp(-0.5 * jnp.square(x32)) * (2 * jnp.pi) ** -0.5
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact}


def split_rng(rng: jax.Array | None, num: int) -> list[jax.Array | None]:
  return [None] * num if rng is None else list(jax.random.split(rng, num))


class MultiHeadAttention(nnx.Module):
  """q/k/v/out projections around `attention.attention`.

  `inner_ln` is MAGNETO's sub-LayerNorm on the concatenated heads, applied
  before out_proj (the decoder has it; the ViT and the connector do not).
  `xpos_center` (self-attention only) turns on xPos: q and k are rotated at
  the tokens' positions before the attention backend, so every backend and
  the KV cache (which stores rotated keys) see the same logits.
  """

  def __init__(
    self,
    width: int,
    heads: int,
    *,
    rngs: nnx.Rngs,
    qkv_init: Initializer,
    out_init: Initializer,
    v_init: Initializer | None = None,
    inner_ln_eps: float | None = None,
    xpos_center: int | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by heads {heads}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Dense(width, width, axes=("embed", "heads"), kernel_init=qkv_init, **kw)
    self.k_proj = Dense(width, width, axes=("embed", "heads"), kernel_init=qkv_init, **kw)
    self.v_proj = Dense(width, width, axes=("embed", "heads"), kernel_init=v_init or qkv_init, **kw)
    self.out_proj = Dense(width, width, axes=("heads", "embed"), kernel_init=out_init, **kw)
    self.inner_attn_ln = (
      LayerNorm(width, axis_name="heads", eps=inner_ln_eps, dtype=dtype, param_dtype=param_dtype)
      if inner_ln_eps is not None
      else None
    )
    self.heads = heads
    self.xpos_center = xpos_center

  def _project(self, x: jax.Array, kv: jax.Array, positions: jax.Array | None = None):
    """q, k, v [b, l, heads, head_dim]; under xPos, q and k rotated at
    `positions` [b, l] (or [1, l]; self-attention: x is kv)."""
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)
    q = constrain(split(self.q_proj(x)), ("act_batch", "act_length", "act_heads", "act_kv"))
    k = constrain(split(self.k_proj(kv)), ("act_batch", "act_length", "act_heads", "act_kv"))
    v = constrain(split(self.v_proj(kv)), ("act_batch", "act_length", "act_heads", "act_kv"))
    if self.xpos_center is not None:
      if positions is None:  # Loud: unrotated q and k would still run, wrongly.
        raise ValueError("xPos attention needs the tokens' positions")
      q = xpos.rotate(q, positions, downscale=False, center=self.xpos_center)
      k = xpos.rotate(k, positions, downscale=True, center=self.xpos_center)
    return q, k, v

  def _output(self, ctx: jax.Array) -> jax.Array:
    ctx = ctx.reshape(*ctx.shape[:-2], -1)
    if self.inner_attn_ln is not None:
      ctx = self.inner_attn_ln(ctx)
    return self.out_proj(ctx)

  def __call__(
    self,
    x: jax.Array,
    kv: jax.Array | None = None,
    *,
    causal: bool,
    implementation: str,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    q, k, v = self._project(x, x if kv is None else kv, positions)
    ctx = attention.attention(
      q,
      k,
      v,
      causal=causal,
      segment_ids=segment_ids,
      implementation=implementation,
      dropout_rate=dropout_rate,
      dropout_rng=dropout_rng,
    )
    return self._output(ctx)

  def cached(
    self,
    x: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    layer: jax.Array,
    index: jax.Array,
    segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    implementation: str,
    positions: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal self-attention of x [b, l, d] through a KV cache (inference).

    k_cache and v_cache are [layers, b, max_len, heads, head_dim]; this layer's
    keys and values are written to slot `layer`, positions index..index+l. A
    block (l > 1) is a prefill into an empty cache and attends within itself,
    exactly as `__call__`; one token (l == 1) attends to every cache position
    whose kv_segment_ids [b, max_len] entry is non-zero (written slots only).
    positions: x's positions (xPos; the cached keys are stored rotated).
    Returns (output, k_cache, v_cache).
    """
    q, k, v = self._project(x, x, positions)
    start = (layer, 0, index, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), start)
    if x.shape[1] > 1:
      ctx = attention.attention(
        q, k, v, causal=True, segment_ids=segment_ids, implementation=implementation
      )
    else:
      ctx = attention.attention(
        q,
        k_cache[layer],
        v_cache[layer],
        causal=False,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        implementation=implementation,
      )
    return self._output(ctx), k_cache, v_cache


REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def stacked(
  make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
) -> nnx.Module:
  """Builds `num_layers` copies of a layer with parameters stacked on axis 0."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    return make_layer(r)

  return make(rngs)


def scan(
  layers: nnx.Module,
  body: Callable,
  x: jax.Array,
  *,
  remat: str,
  rng: jax.Array | None,
  num_layers: int,
) -> jax.Array:
  """Runs `body(layer, x, rng) -> x` over stacked layers with lax.scan.

  Compile time does not grow with depth; `remat` picks what the backward pass
  recomputes (see REMAT_POLICIES).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")
  graphdef, state = nnx.split(layers)

  def step(carry, xs):
    layer_state, layer_rng = xs
    return body(nnx.merge(graphdef, layer_state), carry, layer_rng), None

  if remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  rngs = None if rng is None else jax.random.split(rng, num_layers)
  x, _ = jax.lax.scan(step, x, (state, rngs))
  return x


def scan_cached(layers: nnx.Module, body: Callable, x: jax.Array, cache):
  """Runs `body(layer, x, cache, i) -> (x, cache)` over stacked layers (inference).

  The cache (arrays with a leading layer axis) is carried whole rather than
  scanned over, so layer i updates its slice in place instead of the scan
  copying the cache into a new stacked output.
  """
  graphdef, state = nnx.split(layers)

  def step(carry, xs):
    layer_state, i = xs
    y, c = carry
    return body(nnx.merge(graphdef, layer_state), y, c, i), None

  num_layers = jax.tree.leaves(state)[0].shape[0]
  (x, cache), _ = jax.lax.scan(step, (x, cache), (state, jnp.arange(num_layers)))
  return x, cache
