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


# Values of the slot mask (`image_embeds_position_mask`, models/batch.py).
IMAGE_SLOT, MODALITY_SLOT = 1, 2


def splice(
  token_embeds: jax.Array, embeds: jax.Array, slot_mask: jax.Array, value: int = IMAGE_SLOT
) -> jax.Array:
  """Writes each row's `embeds` into that row's slots marked `value`, in order.

  token_embeds [b, l, d], embeds [b, m, d], slot_mask [b, l]. The k-th slot
  of a row marked `value` receives embeds[row, k] (m = images per row x
  latents, or modality items x soft tokens); other slots keep their tokens.
  """
  slots = slot_mask == value
  index = jnp.clip(jnp.cumsum(slots, axis=1) - 1, 0, embeds.shape[1] - 1)
  gathered = jnp.take_along_axis(embeds, index[..., None], axis=1)
  return jnp.where(slots[..., None], gathered.astype(token_embeds.dtype), token_embeds)


def splice_image_embeds(
  token_embeds: jax.Array, image_embeds: jax.Array, slot_mask: jax.Array
) -> jax.Array:
  """`splice` at the image slots (mask 1); modality slots (2) are not images."""
  return splice(token_embeds, image_embeds, slot_mask, IMAGE_SLOT)


class DecoderBlock(nnx.Module):
  """Pre-LN block with MAGNETO's inner_attn_ln (before out_proj) and ffn_layernorm (before fc2)."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype, init_scale: float, xpos_center=None):
    d, eps = cfg.width, cfg.layer_norm_eps
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    std = layers.normal(0.02)
    # MAGNETO: v_proj, out_proj, fc1, fc2 start scaled by sqrt(log 2N).
    scaled = layers.normal(0.02 * init_scale)
    self.self_attn_layer_norm = layers.LayerNorm(d, axis_name="embed", eps=eps, **kw)
    self.self_attn = layers.MultiHeadAttention(
      d,
      cfg.heads,
      rngs=rngs,
      qkv_init=std,
      v_init=scaled,
      out_init=scaled,
      inner_ln_eps=eps,
      xpos_center=xpos_center,
      **kw,
    )
    self.final_layer_norm = layers.LayerNorm(d, axis_name="embed", eps=eps, **kw)
    self.fc1 = layers.Dense(
      d, cfg.ffn_dim, axes=("embed", "mlp"), rngs=rngs, kernel_init=scaled, **kw
    )
    self.ffn_layernorm = layers.LayerNorm(cfg.ffn_dim, axis_name="mlp", eps=eps, **kw)
    self.fc2 = layers.Dense(
      cfg.ffn_dim, d, axes=("mlp", "embed"), rngs=rngs, kernel_init=scaled, **kw
    )
    self.activation = layers.ACTIVATIONS[cfg.activation]
    self.cfg = cfg

  def __call__(self, x, rng, *, segment_ids, implementation, positions=None):
    cfg = self.cfg
    r_attn, r_out, r_act, r_ffn = layers.split_rng(rng, 4)
    h = self.self_attn(
      self.self_attn_layer_norm(x),
      causal=True,
      segment_ids=segment_ids,
      positions=positions,
      implementation=implementation,
      dropout_rate=cfg.attention_dropout,
      dropout_rng=r_attn,
    )
    x = x + layers.dropout(h, cfg.dropout, r_out)
    return self._ffn(x, r_act, r_ffn)

  def _ffn(self, x, r_act=None, r_ffn=None):
    cfg = self.cfg
    h = self.activation(self.fc1(self.final_layer_norm(x)))
    h = layers.constrain(h, ("act_batch", "act_length", "act_mlp"))
    h = layers.dropout(h, cfg.activation_dropout, r_act)
    h = self.fc2(self.ffn_layernorm(h))
    x = x + layers.dropout(h, cfg.dropout, r_ffn)
    return layers.constrain(x, ("act_batch", "act_length", "act_embed"))

  def cached(
    self,
    x,
    k_cache,
    v_cache,
    *,
    layer,
    index,
    segment_ids,
    kv_segment_ids,
    implementation,
    positions=None,
  ):
    """`__call__` at inference through a KV cache (see MultiHeadAttention.cached)."""
    h, k_cache, v_cache = self.self_attn.cached(
      self.self_attn_layer_norm(x),
      k_cache,
      v_cache,
      layer=layer,
      index=index,
      segment_ids=segment_ids,
      kv_segment_ids=kv_segment_ids,
      implementation=implementation,
      positions=positions,
    )
    return self._ffn(x + h), k_cache, v_cache


# Longest wavelength ~600 cells: with 10,000 (the ViT's) most dimensions would
# be nearly constant over a 16-32 cell grid and every location token alike.
LOCATION_TEMPERATURE = 100.0


def _init_locations(embed: jax.Array, cfg, first: int) -> jax.Array:
  """The location tokens' rows of `embed` (from id `first`) under `cfg.location_init`."""
  # .get: configs saved before these init-only keys restore unchanged.
  init = cfg.get("location_init", "normal")
  if init == "normal":
    return embed
  if init != "sincos2d":
    raise ValueError(f"text.location_init {init!r}: expected 'normal' or 'sincos2d'")
  side = cfg.num_patches_per_side
  if first < 1:
    raise ValueError(
      f"text.num_patches_per_side {side}: {side * side} location tokens do not "
      f"fit in text.vocab_size {cfg.vocab_size}"
    )
  table = layers.sincos2d(side, cfg.width, LOCATION_TEMPERATURE)
  table = table * (0.02 / table.std())  # the other rows' scale
  return embed.at[first : first + side * side].set(table.astype(embed.dtype))


POSITIONS = ("sinusoidal", "xpos")


def position_kind(cfg) -> str:
  """`text.position`, checked; configs saved before the key are sinusoidal."""
  kind = cfg.get("position", "sinusoidal")
  if kind not in POSITIONS:
    raise ValueError(f"text.position {kind!r}: expected one of {list(POSITIONS)}")
  return kind


class TextDecoder(nnx.Module):
  """Token + image embeddings -> causal MAGNETO stack -> tied LM head.

  Positions (`text.position`): "sinusoidal" adds fairseq's absolute table to
  the embeddings (Kosmos-2); "xpos" adds nothing there and rotates q and k in
  every layer instead (KOSMOS-1, models/xpos.py).
  """

  def __init__(
    self,
    cfg,
    *,
    rngs,
    dtype,
    param_dtype,
    remat,
    attention,
    magneto_init: bool,
    first_location: int,
  ):
    """`first_location`: `<patch_index_0000>`'s id (models/config.first_location_id:
    the modalities' tag rows, if any, come after the grid)."""
    self.position = position_kind(cfg)
    embed = layers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.width), param_dtype)
    embed = _init_locations(embed, cfg, first_location)
    self.embed_tokens = layers.param(embed.at[cfg.pad_id].set(0.0), ("vocab", "embed"))
    init_scale = math.sqrt(math.log(2 * cfg.depth)) if magneto_init else 1.0
    # A fixed centre, not torchscale's length-dependent one: see xpos.py.
    xpos_center = cfg.max_positions // 2 if self.position == "xpos" else None
    self.layers = layers.stacked(
      lambda r: DecoderBlock(
        cfg,
        rngs=r,
        dtype=dtype,
        param_dtype=param_dtype,
        init_scale=init_scale,
        xpos_center=xpos_center,
      ),
      cfg.depth,
      rngs,
    )
    self.layer_norm = layers.LayerNorm(
      cfg.width, axis_name="embed", eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.cfg, self.dtype, self.remat, self.attention = cfg, dtype, remat, attention

  def embed(
    self,
    input_ids,
    *,
    image_embeds=None,
    image_embeds_position_mask=None,
    position_ids=None,
    rng=None,
    modality_tokens=None,
  ) -> jax.Array:
    """Token embeddings [b, l, d] with image embeddings [b, m, d] at the
    mask's 1 slots and modality soft tokens [b, n, d] at its 2 slots."""
    cfg = self.cfg
    x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
    if image_embeds is not None:
      x = splice(x, image_embeds, image_embeds_position_mask, IMAGE_SLOT)
    if modality_tokens is not None and modality_tokens.shape[1]:
      x = splice(x, modality_tokens, image_embeds_position_mask, MODALITY_SLOT)
    # Scales the spliced image embeddings too, as released, and the soft
    # tokens alike: every slot enters the decoder on the same footing.
    if cfg.scale_embedding:
      x = x * math.sqrt(cfg.width)
    if self.position == "sinusoidal":
      if position_ids is None:
        position_ids = positions_from_ids(input_ids, cfg.pad_id)
      x = x + sinusoidal_positions(position_ids, cfg.width, cfg.pad_id).astype(self.dtype)
    x = layers.dropout(x, cfg.dropout, rng)
    return layers.constrain(x, ("act_batch", "act_length", "act_embed"))

  def __call__(
    self,
    hidden: jax.Array,
    *,
    segment_ids: jax.Array | None,
    positions: jax.Array | None = None,
    rng: jax.Array | None = None,
  ) -> jax.Array:
    """Embedded inputs [b, l, d] -> logits [b, l, vocab] (float32).

    positions [b, l]: the tokens' positions for xPos (packed rows restart
    them per segment); unused by sinusoidal models, whose positions are in
    `hidden` already. Default: 0 .. l - 1 in every row, which is right for
    any unpacked row, left padded or not, as xPos only sees distances.
    """
    if positions is None and self.position == "xpos":
      positions = jnp.arange(hidden.shape[1])[None]

    def body(layer, y, r):
      return layer(
        y, r, segment_ids=segment_ids, positions=positions, implementation=self.attention
      )

    x = layers.scan(self.layers, body, hidden, remat=self.remat, rng=rng, num_layers=self.cfg.depth)
    return self._logits(x)

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.layer_norm(x)
    logits = jnp.dot(
      x, self.embed_tokens[...].astype(self.dtype).T, preferred_element_type=jnp.float32
    )
    return layers.constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache for `decode`: a plain pytree.

    k, v: [layers, batch, max_len, heads, head_dim] in the compute dtype.
    segment_ids: [batch, max_len], 0 for unwritten slots and padding.
    index: the next slot to write. Rows advance together (batches are left
    padded), so one index serves every row.
    """
    cfg = self.cfg
    shape = (cfg.depth, batch, max_len, cfg.heads, cfg.width // cfg.heads)
    return dict(
      k=jnp.zeros(shape, self.dtype),
      v=jnp.zeros(shape, self.dtype),
      segment_ids=jnp.zeros((batch, max_len), jnp.int32),
      index=jnp.zeros((), jnp.int32),
    )

  def decode(
    self, hidden: jax.Array, cache: dict, *, segment_ids: jax.Array
  ) -> tuple[jax.Array, dict]:
    """Embedded inputs [b, l, d] written at cache["index"] -> (logits of the
    last position [b, vocab] float32, updated cache).

    l > 1 is the prefill of an empty cache (same computation as `__call__`);
    l == 1 is one decoding step. segment_ids [b, l]: 0 marks padding.
    Under xPos a token's position is its cache slot: rows are left padded,
    so each row's tokens sit in consecutive slots, and only distances count.
    """
    index = cache["index"]
    positions = index + jnp.arange(hidden.shape[1])[None]
    segment_ids = segment_ids.astype(jnp.int32)
    kv_segment_ids = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))

    def body(layer, x, kv, i):
      x, k, v = layer.cached(
        x,
        *kv,
        layer=i,
        index=index,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        implementation=self.attention,
        positions=positions,
      )
      return x, (k, v)

    x, (k, v) = layers.scan_cached(self.layers, body, hidden, (cache["k"], cache["v"]))
    cache = dict(k=k, v=v, segment_ids=kv_segment_ids, index=index + hidden.shape[1])
    return self._logits(x[:, -1:])[:, 0], cache


def select_cache_rows(cache: dict, rows: jax.Array) -> dict:
  """The cache of batch rows `rows` (beam expansion and reordering)."""
  return dict(
    k=cache["k"][:, rows],
    v=cache["v"][:, rows],
    segment_ids=cache["segment_ids"][rows],
    index=cache["index"],
  )
