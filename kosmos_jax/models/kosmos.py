"""Kosmos-2: ViT -> connector -> image slots in the token sequence -> MAGNETO decoder.

Called with the keyword arguments of transformers'
`Kosmos2ForConditionalGeneration.forward` (reference/kosmos2.md 1.2).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kosmos_jax.models import config as model_config
from kosmos_jax.models import (
  connector,
  decoder,
  generation,
  layers,
  mixing,
  modalities,
  resampler,
  scoring,
  vit,
)
from kosmos_jax.processing import views


@flax.struct.dataclass
class KosmosOutput:
  logits: jax.Array  # [batch, length, vocab], float32
  image_embeds: jax.Array | None  # [batch, images * slots, text width]


def _as_array(x, dtype=None):
  return None if x is None else jnp.asarray(x, dtype=dtype)


def _connector(config, **kw) -> nnx.Module:
  """The `config.connector` module: [n, tokens, vision width] -> [n, latents, text width]
  (tokens of the text width after a tower mix, models/mixing.py)."""
  # .get: configs saved before the option restore as the released connector.
  kind = config.get("connector", "kosmos2")
  width = config.text.width if mixing.names(config) else config.vision.width
  common = dict(attention=config.attention, attention_dropout=config.text.attention_dropout, **kw)
  if kind == "kosmos2":
    return connector.ImageToTextProjection(
      width,
      config.text.width,
      config.text.heads,
      config.latent_query_num,
      init=config.get("connector_init", "hf"),
      **common,
    )
  if kind == "perceiver":
    return resampler.PerceiverResampler(
      width,
      config.text.width,
      config.latent_query_num,
      config.perceiver,
      eps=config.text.layer_norm_eps,
      remat=config.remat,
      **common,
    )
  raise ValueError(f"model.connector {kind!r}: expected 'kosmos2' or 'perceiver'")


def init_view_tags(key: jax.Array, width: int, dtype) -> jax.Array:
  """[2, width] start/end view tags (processing/views.py), normal(0.02) as
  the text embeddings they sit among."""
  return layers.normal(0.02)(key, (2, width), dtype)


class Kosmos2(nnx.Module):
  """The Kosmos-2 model. `config` is `kosmos_jax.models.config.model_config()`."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    config = ml_collections.FrozenConfigDict(config)
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.vision_model = vit.VisionTransformer(
      config.vision, remat=config.remat, attention=config.attention, **kw
    )
    if mixing.names(config):  # SPHINX's encoder mix (models/mixing.py)
      mixing.check(config)
      self.towers = mixing.Towers(config, dict(kw, remat=config.remat, attention=config.attention))
      self.tower_mix = mixing.TowerMix(config, **kw)
    self.image_to_text_projection = _connector(config, **kw)
    self.text_model = decoder.TextDecoder(
      config.text,
      remat=config.remat,
      attention=config.attention,
      magneto_init=config.magneto_init,
      first_location=model_config.first_location_id(config),
      **kw,
    )
    # Built last, so that adding modalities leaves the other parameters'
    # init (the rngs stream) unchanged.
    projections = modalities.projections(config, **kw)
    if projections is not None:
      self.modality_projections = projections
    if views.tagged(config.vision):  # the start/end tags of every view's slots
      self.view_tags = layers.param(
        init_view_tags(rngs.params(), config.text.width, param_dtype), (None, "embed")
      )
    self.config = config

  def encode_images(self, pixel_values: Any, rng: jax.Array | None = None) -> jax.Array:
    """pixel_values [b, C, H, W] or [b, images, C, H, W] (NCHW, as the processor
    returns them) -> image embeddings [b, images * slots, text width]; slots
    = latents, or with views (processing/views.py) each view's latents
    between the view tags."""
    pixel_values = jnp.asarray(pixel_values)
    if pixel_values.ndim == 4:
      pixel_values = pixel_values[:, None]
    if pixel_values.ndim != 5:
      raise ValueError(
        f"pixel_values must be [b, C, H, W] or [b, n, C, H, W], got shape {pixel_values.shape}"
      )
    b, n = pixel_values.shape[:2]
    images = pixel_values.reshape(b * n, *pixel_values.shape[2:]).transpose(0, 2, 3, 1)
    tagged = views.tagged(self.config.vision)
    if tagged:
      images = views.split(images, self.config.vision)
    r_vit, r_proj = layers.split_rng(rng, 2)
    hidden = self.vision_model(images, r_vit)
    # post_layernorm on every token, then L2 normalisation (eps as torch's F.normalize).
    hidden = self.vision_model.post_layernorm(hidden).astype(jnp.float32)
    hidden = hidden / jnp.maximum(jnp.linalg.norm(hidden, axis=-1, keepdims=True), 1e-12)
    hidden = hidden.astype(self.vision_model.dtype)
    if mixing.names(self.config):
      hidden = mixing.mix(self.config, self.towers, self.tower_mix, images, hidden)
    embeds = self.image_to_text_projection(hidden, r_proj)
    if tagged:
      embeds = views.wrap(embeds, self.view_tags[...], self.config.vision)
    return embeds.reshape(b, n * embeds.shape[1], embeds.shape[2])

  def encode_modalities(self, modality_embeds: Any, modality_types: Any) -> jax.Array | None:
    """modality_embeds [b, M, D], modality_types [b, M] (models/batch.py) ->
    soft tokens [b, M * modality_tokens, text width] for the mask's 2 slots;
    None without modality inputs."""
    if modality_embeds is None:
      return None
    if modality_types is None:
      raise ValueError("modality_types is required with modality_embeds")
    if not hasattr(self, "modality_projections"):
      raise ValueError(
        "modality_embeds given, but the model has no modalities (model.modalities is empty)"
      )
    return self.modality_projections(
      jnp.asarray(modality_embeds), jnp.asarray(modality_types, jnp.int32)
    )

  def __call__(
    self,
    input_ids: Any,
    pixel_values: Any = None,
    attention_mask: Any = None,
    image_embeds_position_mask: Any = None,
    *,
    image_embeds: Any = None,
    position_ids: Any = None,
    segment_ids: Any = None,
    dropout_rng: jax.Array | None = None,
    modality_embeds: Any = None,
    modality_types: Any = None,
  ) -> KosmosOutput:
    """Logits for `input_ids` [b, l].

    Args:
      input_ids, pixel_values, attention_mask, image_embeds_position_mask: as
        in transformers (numpy or jax arrays). Without pixel_values and
        image_embeds the input is text only.
      image_embeds: precomputed `encode_images` output (skips the vision tower).
      position_ids: explicit positions (packed sequences); default from input_ids.
      segment_ids: [b, l] packed-segment ids, 0 = padding; default attention_mask.
      dropout_rng: enables dropout (training); None is inference.
      modality_embeds, modality_types: [b, M, D] vectors and [b, M] type ids
        (-1 = empty) of other modalities (models/batch.py), projected to soft
        tokens for the slots image_embeds_position_mask marks 2.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    r_img, r_embed, r_dec = layers.split_rng(dropout_rng, 3)
    if pixel_values is not None and not jnp.size(pixel_values):
      pixel_values = None  # rows without pictures (a batch of 0 images per row)
    if image_embeds is None and pixel_values is not None:
      image_embeds = self.encode_images(pixel_values, r_img)
    image_embeds = _as_array(image_embeds)
    soft_tokens = self.encode_modalities(modality_embeds, modality_types)
    if (image_embeds is not None or soft_tokens is not None) and image_embeds_position_mask is None:
      raise ValueError(
        "image_embeds_position_mask is required with pixel_values, image_embeds "
        "or modality_embeds: it marks where the image (1) and modality (2) slots are"
      )
    if segment_ids is None and attention_mask is not None:
      segment_ids = attention_mask
    hidden = self.text_model.embed(
      input_ids,
      image_embeds=image_embeds,
      image_embeds_position_mask=_as_array(image_embeds_position_mask, jnp.int32),
      position_ids=_as_array(position_ids, jnp.int32),
      rng=r_embed,
      modality_tokens=soft_tokens,
    )
    logits = self.text_model(
      hidden,
      segment_ids=_as_array(segment_ids, jnp.int32),
      positions=_as_array(position_ids, jnp.int32),  # xPos reads them in every layer
      rng=r_dec,
    )
    return KosmosOutput(logits=logits, image_embeds=image_embeds)

  def score(
    self,
    input_ids: Any,
    pixel_values: Any = None,
    attention_mask: Any = None,
    image_embeds_position_mask: Any = None,
    *,
    candidates,
    batch_size: int = 128,
    modality_embeds: Any = None,
    modality_types: Any = None,
  ) -> dict:
    """Log-likelihoods of candidate continuations after each (left-padded)
    prompt: `sum` and per-token `mean`, float32 [prompts, candidates].

    The image and prompt run once; the candidates (token id lists, e.g. a
    class name's tokens and `</s>`) then run in batches against the prompt's
    KV cache (models/scoring.py): KOSMOS-1's zero-shot classification, or
    Raven-style "Is it correct? Yes" scoring.
    """
    total = scoring.score_continuations(
      self,
      input_ids,
      pixel_values,
      attention_mask,
      image_embeds_position_mask,
      candidates,
      batch_size=batch_size,
      modality_embeds=modality_embeds,
      modality_types=modality_types,
    )
    lengths = jnp.asarray([len(c) for c in candidates], jnp.float32)
    return dict(sum=total, mean=total / lengths)

  def generate(
    self,
    input_ids: Any,
    pixel_values: Any = None,
    attention_mask: Any = None,
    image_embeds_position_mask: Any = None,
    *,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    no_repeat_ngram_size: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    min_length: int | None = None,
    min_new_tokens: int | None = None,
    repetition_penalty: float | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer: Any = None,
    num_return_sequences: int | None = None,
    modality_embeds: Any = None,
    modality_types: Any = None,
  ):
    """Generates token ids, as transformers' `Kosmos2ForConditionalGeneration.generate`.

    Inputs are the processor's (numpy or jax arrays); batches must be left
    padded. A None option takes the checkpoint's `generation_config` (read
    by `from_pretrained`), else transformers' default: num_beams=1,
    do_sample=False, temperature=1, top_k=0 (off), top_p=1,
    no_repeat_ngram_size=0 (off), length_penalty=1, early_stopping=False;
    eos/pad ids default to the model config's. max_new_tokens is required
    unless the generation config has it. Greedy and beam search equal
    transformers token for token; sampling is reproducible for a `seed`.
    Also as transformers: min_length (counts the prompt) / min_new_tokens,
    repetition_penalty, several eos ids, stop_strings (with
    tokenizer=the processor), num_return_sequences (rows i*n .. i*n+n-1 for
    prompt i). Option values are traced: new values do not recompile.
    modality_embeds / modality_types (the processor's): other-modality
    vectors, projected once into the prompt's 2 slots.

    Returns:
      int64 numpy [batch * num_return_sequences, prompt length + new tokens]: the prompt, then the
      new tokens; rows that hit EOS early are filled with the pad id, and the
      output stops at the last step some row still needed.
    """
    return generation.generate(
      self,
      input_ids,
      pixel_values,
      attention_mask,
      image_embeds_position_mask,
      max_new_tokens=max_new_tokens,
      num_beams=num_beams,
      do_sample=do_sample,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      no_repeat_ngram_size=no_repeat_ngram_size,
      length_penalty=length_penalty,
      early_stopping=early_stopping,
      seed=seed,
      eos_token_id=eos_token_id,
      pad_token_id=pad_token_id,
      min_length=min_length,
      min_new_tokens=min_new_tokens,
      repetition_penalty=repetition_penalty,
      stop_strings=stop_strings,
      tokenizer=tokenizer,
      num_return_sequences=num_return_sequences,
      modality_embeds=modality_embeds,
      modality_types=modality_types,
    )
