"""BLIP-2's Q-Former (transformers' Blip2QFormerModel), query tokens only.

SPHINX (sphinx_pandagpt.md 1.4) runs BLIP-2's EVA ViT-g on each 224 px view
and takes the Q-Former's 32 query tokens (width 768) as its "global" stream.
This module is the querying transformer alone: the caller runs whatever
vision encoder feeds it and passes that encoder's features
[b, n, encoder_hidden_size] (1408 for BLIP-2's EVA ViT-g); the Q-Former's
keys and values project from that width.

The path transformers takes with `query_embeds` and no text, BERT-style
post-norm throughout (each sub-block is LN(x + dropout(dense(f(x))))):
  x = dropout(LN(query_tokens))                   no position embeddings
  for layer i:
    x = LN(x + dense(self_attention(x)))
    if i % cross_attention_frequency == 0:
      x = LN(x + dense(cross_attention(x, features)))
    x = LN(x + output_query(act(intermediate_query(x))))
The last layer's output is the result (no final norm). The text-token
feed-forward (`intermediate`/`output`) never sees a query token, so it is
not built.

Layers are a Python list, not a scanned stack: with a cross-attention every
`cross_attention_frequency` layers they are of two shapes, a list keeps
transformers' layer indices one-to-one for any depth and frequency, and 12
layers over 32 queries compile quickly unrolled. Checkpoint loading is in
`kosmos_jax/checkpoints/qformer.py`.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kosmos_jax.models import attention, layers


def qformer_config(**overrides) -> ml_collections.ConfigDict:
  """Q-Former config; the defaults are BLIP-2's (Salesforce/blip2-*)."""
  c = ml_collections.ConfigDict(
    dict(
      kind="qformer",
      num_query_tokens=32,
      width=768,
      depth=12,
      heads=12,
      mlp_dim=3072,
      activation="gelu",
      cross_attention_frequency=2,
      encoder_hidden_size=1408,  # the width of the features it reads
      layer_norm_eps=1e-12,
      dropout=0.1,  # transformers' hidden_dropout_prob (training only)
      attention_dropout=0.1,  # attention_probs_dropout_prob (training only)
      max_position_embeddings=512,  # text tokens' table: unused by the query-only path
    )
  )
  for key, value in overrides.items():
    if key not in c:
      raise KeyError(f"unknown Q-Former config key {key!r}")
    c[key] = value
  return c


class Attention(nnx.Module):
  """LN(x + dense(softmax(q k^T / sqrt(hd)) v)), keys and values from `kv`
  of width `kv_width` (the features for cross-attention, x otherwise)."""

  def __init__(self, cfg, kv_width: int, *, rngs, dtype, param_dtype):
    d = cfg.width
    if d % cfg.heads:
      raise ValueError(f"Q-Former width {d} is not divisible by heads {cfg.heads}")
    kw = dict(rngs=rngs, kernel_init=layers.normal(0.02), dtype=dtype, param_dtype=param_dtype)
    self.query = layers.Dense(d, d, axes=("embed", "heads"), **kw)
    self.key = layers.Dense(kv_width, d, axes=("embed", "heads"), **kw)
    self.value = layers.Dense(kv_width, d, axes=("embed", "heads"), **kw)
    self.dense = layers.Dense(d, d, axes=("heads", "embed"), **kw)
    self.norm = layers.LayerNorm(
      d, axis_name="embed", eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.heads, self.cfg = cfg.heads, cfg

  def __call__(self, x, kv, kv_mask, rng):
    attn_rng, out_rng = layers.split_rng(rng, 2)
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)
    # xla: a 32-query attention gains nothing from a kernel, and only xla has
    # attention dropout and a key mask that differs from the queries'.
    ctx = attention.attention(
      split(self.query(x)),
      split(self.key(kv)),
      split(self.value(kv)),
      causal=False,
      kv_segment_ids=kv_mask,
      implementation="xla",
      dropout_rate=self.cfg.attention_dropout,
      dropout_rng=attn_rng,
    )
    y = self.dense(ctx.reshape(*ctx.shape[:-2], -1))
    return self.norm(x + layers.dropout(y, self.cfg.dropout, out_rng))


class FeedForward(nnx.Module):
  """LN(x + output(act(intermediate(x)))): transformers' intermediate_query
  and output_query, the feed-forward of the query tokens."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d, f = cfg.width, cfg.mlp_dim
    if cfg.activation not in layers.ACTIVATIONS:
      raise ValueError(
        f"Q-Former activation {cfg.activation!r} is not one of {list(layers.ACTIVATIONS)}"
      )
    kw = dict(rngs=rngs, kernel_init=layers.normal(0.02), dtype=dtype, param_dtype=param_dtype)
    self.intermediate = layers.Dense(d, f, axes=("embed", "mlp"), **kw)
    self.output = layers.Dense(f, d, axes=("mlp", "embed"), **kw)
    self.norm = layers.LayerNorm(
      d, axis_name="embed", eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.activation, self.rate = layers.ACTIVATIONS[cfg.activation], cfg.dropout

  def __call__(self, x, rng):
    y = self.output(self.activation(self.intermediate(x)))
    return self.norm(x + layers.dropout(y, self.rate, rng))


class Layer(nnx.Module):
  """Self-attention, cross-attention to the features (when `cross`), feed-forward."""

  def __init__(self, cfg, cross: bool, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.self_attention = Attention(cfg, cfg.width, **kw)
    self.cross_attention = Attention(cfg, cfg.encoder_hidden_size, **kw) if cross else None
    self.ffn = FeedForward(cfg, **kw)

  def __call__(self, x, features, feature_mask, rng):
    rngs = layers.split_rng(rng, 3)
    x = self.self_attention(x, x, None, rngs[0])
    if self.cross_attention is not None:
      x = self.cross_attention(x, features, feature_mask, rngs[1])
    x = self.ffn(x, rngs[2])
    return layers.constrain(x, ("act_batch", "act_length", "act_embed"))


class QFormer(nnx.Module):
  """The Q-Former of the module doc; config from `qformer_config` or the
  checkpoint readers."""

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if cfg.cross_attention_frequency < 1:
      raise ValueError(f"cross_attention_frequency {cfg.cross_attention_frequency} is not >= 1")
    d = cfg.width
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    # Stored [n, width]; transformers' query_tokens parameter is [1, n, width].
    tokens = layers.normal(0.02)(rngs.params(), (cfg.num_query_tokens, d), param_dtype)
    self.query_tokens = layers.param(tokens, (None, "embed"))
    self.layernorm = layers.LayerNorm(d, axis_name="embed", eps=cfg.layer_norm_eps, **kw)
    self.layers = nnx.List(
      [
        Layer(cfg, i % cfg.cross_attention_frequency == 0, rngs=rngs, **kw)
        for i in range(cfg.depth)
      ]
    )
    self.cfg, self.dtype = cfg, dtype

  def __call__(
    self,
    features: jax.Array,
    feature_mask: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """features [b, n, encoder_hidden_size] from the vision encoder ->
    query tokens [b, num_query_tokens, width].

    feature_mask: optional [b, n], nonzero where a feature is real (transformers'
    encoder_attention_mask). dropout_rng: None for inference (deterministic).
    """
    if features.ndim != 3 or features.shape[-1] != self.cfg.encoder_hidden_size:
      raise ValueError(
        f"features of shape {features.shape}: the Q-Former reads "
        f"[batch, tokens, {self.cfg.encoder_hidden_size}]"
      )
    rngs = layers.split_rng(dropout_rng, self.cfg.depth + 1)
    tokens = self.query_tokens[...].astype(self.dtype)
    x = jnp.broadcast_to(tokens, (features.shape[0], *tokens.shape))
    x = layers.dropout(self.layernorm(x), self.cfg.dropout, rngs[0])
    features = features.astype(self.dtype)
    if feature_mask is not None:
      feature_mask = (feature_mask != 0).astype(jnp.int32)  # segment id 1 = real, 0 = padding
    for layer, rng in zip(self.layers, rngs[1:]):
      x = layer(x, features, feature_mask, rng)
    return x


def abstract_params(cfg) -> dict:
  """The Q-Former's parameters as ShapeDtypeStructs (allocates nothing)."""
  return nnx.to_pure_dict(
    nnx.state(nnx.eval_shape(lambda: QFormer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  )


def from_params(cfg, params: dict, *, dtype=jnp.float32, param_dtype=jnp.float32) -> QFormer:
  """A Q-Former holding `params` (nested dict of arrays, e.g. from the
  checkpoint readers), cast to param_dtype."""
  make = lambda: QFormer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  graphdef, state = nnx.split(nnx.eval_shape(make))
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params))
  return nnx.merge(graphdef, state)
