"""MAGNETO text decoder with sub-LayerNorm (reference/kosmos2.md 1.5-1.7)."""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kosmos_jax.models import layers


def sinusoidal_positions(position_ids: jax.Array, dim: int, padding_idx: int) -> jax.Array:
  """fairseq sinusoidal embedding: [sin block | cos block], zero at padding_idx."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  angles = position_ids.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return jnp.where((position_ids == padding_idx)[..., None], 0.0, emb)


def positions_from_ids(input_ids: jax.Array, pad_id: int) -> jax.Array:
  """fairseq make_positions: real tokens count from pad_id + 1, pads get pad_id.

  Computed from the non-pad cumulative sum, so left padding does not shift the
  first real token away from position pad_id + 1.
  """
  real = (input_ids != pad_id).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + pad_id


def splice_image_embeds(token_embeds: jax.Array, image_embeds: jax.Array,
                        slot_mask: jax.Array) -> jax.Array:
  """Writes each row's image embeddings into that row's slot positions, in order.

  token_embeds [b, l, d], image_embeds [b, m, d], slot_mask [b, l]. The k-th
  slot of a row receives image_embeds[row, k] (m = images per row x latents).
  """
  slot_mask = slot_mask.astype(bool)
  index = jnp.clip(jnp.cumsum(slot_mask, axis=1) - 1, 0, image_embeds.shape[1] - 1)
  gathered = jnp.take_along_axis(image_embeds, index[..., None], axis=1)
  return jnp.where(slot_mask[..., None], gathered.astype(token_embeds.dtype), token_embeds)


class DecoderBlock(nnx.Module):
  """Pre-LN block with MAGNETO's inner_attn_ln (before out_proj) and ffn_layernorm (before fc2)."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype, init_scale: float):
    d, eps = cfg.width, cfg.layer_norm_eps
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    std = layers.normal(0.02)
    # MAGNETO: v_proj, out_proj, fc1, fc2 start scaled by sqrt(log 2N).
    scaled = layers.normal(0.02 * init_scale)
    self.self_attn_layer_norm = layers.LayerNorm(d, axis_name="embed", eps=eps, **kw)
    self.self_attn = layers.MultiHeadAttention(
        d, cfg.heads, rngs=rngs, qkv_init=std, v_init=scaled, out_init=scaled,
        inner_ln_eps=eps, **kw)
    self.final_layer_norm = layers.LayerNorm(d, axis_name="embed", eps=eps, **kw)
    self.fc1 = layers.Dense(d, cfg.ffn_dim, axes=("embed", "mlp"), rngs=rngs,
                            kernel_init=scaled, **kw)
    self.ffn_layernorm = layers.LayerNorm(cfg.ffn_dim, axis_name="mlp", eps=eps, **kw)
    self.fc2 = layers.Dense(cfg.ffn_dim, d, axes=("mlp", "embed"), rngs=rngs,
                            kernel_init=scaled, **kw)
    self.activation = layers.ACTIVATIONS[cfg.activation]
    self.cfg = cfg

  def __call__(self, x, rng, *, segment_ids, implementation):
    cfg = self.cfg
    r_attn, r_out, r_act, r_ffn = layers.split_rng(rng, 4)
    h = self.self_attn(self.self_attn_layer_norm(x), causal=True,
                       segment_ids=segment_ids, implementation=implementation,
                       dropout_rate=cfg.attention_dropout, dropout_rng=r_attn)
    x = x + layers.dropout(h, cfg.dropout, r_out)
    h = self.activation(self.fc1(self.final_layer_norm(x)))
    h = layers.constrain(h, ("batch", "length", "mlp"))
    h = layers.dropout(h, cfg.activation_dropout, r_act)
    h = self.fc2(self.ffn_layernorm(h))
    x = x + layers.dropout(h, cfg.dropout, r_ffn)
    return layers.constrain(x, ("batch", "length", "embed"))


class TextDecoder(nnx.Module):
  """Token + image embeddings -> causal MAGNETO stack -> tied LM head."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype, remat, attention,
               magneto_init: bool):
    embed = layers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.width), param_dtype)
    self.embed_tokens = layers.param(embed.at[cfg.pad_id].set(0.0), ("vocab", "embed"))
    init_scale = math.sqrt(math.log(2 * cfg.depth)) if magneto_init else 1.0
    self.layers = layers.stacked(
        lambda r: DecoderBlock(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype,
                               init_scale=init_scale), cfg.depth, rngs)
    self.layer_norm = layers.LayerNorm(cfg.width, axis_name="embed",
                                       eps=cfg.layer_norm_eps, dtype=dtype,
                                       param_dtype=param_dtype)
    self.cfg, self.dtype, self.remat, self.attention = cfg, dtype, remat, attention

  def embed(self, input_ids, *, image_embeds=None, image_embeds_position_mask=None,
            position_ids=None, rng=None) -> jax.Array:
    cfg = self.cfg
    x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
    if image_embeds is not None:
      x = splice_image_embeds(x, image_embeds, image_embeds_position_mask)
    if cfg.scale_embedding:  # Scales the spliced image embeddings too, as released.
      x = x * math.sqrt(cfg.width)
    if position_ids is None:
      position_ids = positions_from_ids(input_ids, cfg.pad_id)
    x = x + sinusoidal_positions(position_ids, cfg.width, cfg.pad_id).astype(self.dtype)
    x = layers.dropout(x, cfg.dropout, rng)
    return layers.constrain(x, ("batch", "length", "embed"))

  def __call__(self, hidden: jax.Array, *, segment_ids: jax.Array | None,
               rng: jax.Array | None = None) -> jax.Array:
    """Embedded inputs [b, l, d] -> logits [b, l, vocab] (float32)."""
    body = lambda layer, y, r: layer(y, r, segment_ids=segment_ids,
                                     implementation=self.attention)
    x = layers.scan(self.layers, body, hidden, remat=self.remat, rng=rng,
                    num_layers=self.cfg.depth)
    x = self.layer_norm(x)
    logits = jnp.dot(x, self.embed_tokens[...].astype(self.dtype).T,
                     preferred_element_type=jnp.float32)
    return layers.constrain(logits, ("batch", "length", "vocab"))
