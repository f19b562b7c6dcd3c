"""Image-to-text connector (reference/kosmos2.md 1.4, the original XConnector).

Dense to the text width, then 64 learned latent queries attend once over
[image tokens; latents]. No mask, residual, FFN or LayerNorm: that is the
released design, not an omission.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from kosmos_jax.models import layers

# (dense, q/k, v, latent query) init stds by text width; see model_config's
# `connector_init`. With "hf" at small widths the image tokens reach the output
# at about 1% of the latents' scale and with uniform attention: the spatial
# layout is averaged away and the decoder learns to ignore the slots. "scaled"
# keeps std-1 latents, so that the queries differ from the first step (near-zero
# latents give near-zero queries: uniform attention, identical slots and
# identical gradients, so the latents never specialise), with q/k at twice the
# 1/sqrt(width) scale for attention logits of order one.
INITS = {
  "hf": lambda width: (0.02, 0.02, 0.02, 1.0),
  "scaled": lambda width: (1.0, 2 * width**-0.5, width**-0.5, 1.0),
}


class ImageToTextProjection(nnx.Module):
  def __init__(
    self,
    vision_width: int,
    text_width: int,
    heads: int,
    num_latents: int,
    *,
    rngs,
    dtype,
    param_dtype,
    attention,
    attention_dropout: float,
    init: str = "hf",
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if init not in INITS:
      raise ValueError(f"connector_init {init!r}: expected one of {sorted(INITS)}")
    dense_std, qk_std, v_std, latent_std = INITS[init](text_width)
    self.dense = layers.Dense(
      vision_width,
      text_width,
      axes=(None, "embed"),
      rngs=rngs,
      kernel_init=layers.normal(dense_std),
      **kw,
    )
    self.latent_query = layers.param(
      layers.normal(latent_std)(rngs.params(), (num_latents, text_width), param_dtype),
      (None, "embed"),
    )
    self.x_attn = layers.MultiHeadAttention(
      text_width,
      heads,
      rngs=rngs,
      qkv_init=layers.normal(qk_std),
      v_init=layers.normal(v_std),
      out_init=layers.normal(0.02),
      **kw,
    )
    self.dtype, self.attention = dtype, attention
    self.attention_dropout = attention_dropout

  def __call__(self, features: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """features [n, tokens, vision_width] -> [n, num_latents, text_width]."""
    hidden = self.dense(features)
    latents = jnp.broadcast_to(
      self.latent_query[...].astype(self.dtype), (hidden.shape[0], *self.latent_query.shape)
    )
    kv = jnp.concatenate([hidden, latents], axis=1)
    return self.x_attn(
      latents,
      kv,
      causal=False,
      implementation=self.attention,
      dropout_rate=self.attention_dropout,
      dropout_rng=rng,
    )
