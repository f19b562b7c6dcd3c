"""Flamingo's Perceiver resampler (Alayrac et al. 2022, appendix), the connector
`model.connector = "perceiver"`: KOSMOS-1's "Resampler" (reference/kosmos2.md 3.4).

The image tokens are projected to the text width by the same dense layer as
the Kosmos-2 connector; then `depth` layers, each

  latents += Attention(q = LN_l(latents), k = v = [LN_m(media); LN_l(latents)])
  latents += FFN(latents),   FFN = LN -> Dense(d, mult d) -> GELU -> Dense(mult d, d)

with bias-free attention projections, and a final LayerNorm on the latents.
The layers are stacked and scanned like the decoder's; attention dropout is
the Kosmos-2 connector's (`text.attention_dropout`), and it always takes the
xla attention path (cross-attention, as that connector's does).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from kosmos_jax.models import attention, layers

_ACT = ("act_batch", "act_length", "act_heads", "act_kv")


class ResamplerBlock(nnx.Module):
  def __init__(self, width, heads, head_dim, ffn_mult, depth, *, eps, rngs, dtype, param_dtype):
    inner, ffn = heads * head_dim, ffn_mult * width
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm = lambda: layers.LayerNorm(
      width, axis_name="embed", eps=eps, dtype=dtype, param_dtype=param_dtype
    )
    # Unit-variance q/k/v after the LayerNorms (attention logits of order one);
    # the residual writers (out_proj, fc2) shrink with depth, GPT-2 style, so
    # the std-1 latents stay the bulk of the stream at init.
    qkv = layers.normal(width**-0.5)
    residual = lambda n: layers.normal(n**-0.5 * (2 * depth) ** -0.5)
    self.media_layer_norm = norm()
    self.latent_layer_norm = norm()
    self.q_proj = layers.Dense(
      width, inner, axes=("embed", "heads"), kernel_init=qkv, use_bias=False, **kw
    )
    self.k_proj = layers.Dense(
      width, inner, axes=("embed", "heads"), kernel_init=qkv, use_bias=False, **kw
    )
    self.v_proj = layers.Dense(
      width, inner, axes=("embed", "heads"), kernel_init=qkv, use_bias=False, **kw
    )
    self.out_proj = layers.Dense(
      inner, width, axes=("heads", "embed"), kernel_init=residual(inner), use_bias=False, **kw
    )
    self.ffn_layer_norm = norm()
    self.fc1 = layers.Dense(width, ffn, axes=("embed", "mlp"), kernel_init=qkv, **kw)
    self.fc2 = layers.Dense(ffn, width, axes=("mlp", "embed"), kernel_init=residual(ffn), **kw)
    self.heads = heads

  def __call__(self, latents, media, rng, *, implementation, attention_dropout):
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)
    lat = self.latent_layer_norm(latents)
    # The same k/v projections see the image tokens and the latents.
    kv = jnp.concatenate([self.media_layer_norm(media), lat], axis=1)
    q = layers.constrain(split(self.q_proj(lat)), _ACT)
    k = layers.constrain(split(self.k_proj(kv)), _ACT)
    v = layers.constrain(split(self.v_proj(kv)), _ACT)
    ctx = attention.attention(
      q,
      k,
      v,
      causal=False,
      implementation=implementation,
      dropout_rate=attention_dropout,
      dropout_rng=rng,
    )
    latents = latents + self.out_proj(ctx.reshape(*ctx.shape[:-2], -1))
    h = layers.gelu_exact(self.fc1(self.ffn_layer_norm(latents)))
    h = layers.constrain(h, ("act_batch", "act_length", "act_mlp"))
    latents = latents + self.fc2(h)
    return layers.constrain(latents, ("act_batch", "act_length", "act_embed"))


class PerceiverResampler(nnx.Module):
  """features [n, tokens, vision_width] -> [n, num_latents, text_width], the
  contract of connector.ImageToTextProjection."""

  def __init__(
    self,
    vision_width: int,
    text_width: int,
    num_latents: int,
    cfg,
    *,
    rngs,
    dtype,
    param_dtype,
    eps: float,
    remat: str,
    attention,
    attention_dropout: float,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    # The Kosmos-2 connector's projection; its input is L2-normalised, so std 1
    # gives unit-scale media tokens (each layer normalises them again anyway).
    self.dense = layers.Dense(
      vision_width,
      text_width,
      axes=(None, "embed"),
      rngs=rngs,
      kernel_init=layers.normal(1.0),
      **kw,
    )
    # Std-1 latents: distinct queries from the first step, so the slots differ.
    self.latent_query = layers.param(
      layers.normal(1.0)(rngs.params(), (num_latents, text_width), param_dtype), (None, "embed")
    )
    self.layers = layers.stacked(
      lambda r: ResamplerBlock(
        text_width, cfg.heads, cfg.head_dim, cfg.ffn_mult, cfg.depth, eps=eps, rngs=r, **kw
      ),
      cfg.depth,
      rngs,
    )
    self.layer_norm = layers.LayerNorm(text_width, axis_name="embed", eps=eps, **kw)
    self.depth, self.dtype, self.remat, self.attention = cfg.depth, dtype, remat, attention
    self.attention_dropout = attention_dropout

  def __call__(self, features: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    media = self.dense(features)
    latents = jnp.broadcast_to(
      self.latent_query[...].astype(self.dtype), (media.shape[0], *self.latent_query.shape)
    )
    body = lambda layer, x, r: layer(
      x,
      media,
      r,
      implementation=self.attention,
      attention_dropout=self.attention_dropout,
    )
    latents = layers.scan(
      self.layers, body, latents, remat=self.remat, rng=rng, num_layers=self.depth
    )
    return self.layer_norm(latents)
