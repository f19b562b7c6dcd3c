"""Other modalities as soft tokens: PandaGPT's projected embeddings
(reference/sphinx_pandagpt.md 2.1), one learned projection per modality.

An item is one precomputed vector (e.g. an ImageBind audio embedding) of its
modality's width; its modality's Dense maps it to `modality_tokens` vectors
of the text width, which the decoder splices into the slots the mask marks 2
(decoder.splice), before the embedding scale, as image embeddings are.
PandaGPT uses one token and a single projection for every modality; here
each modality has its own (its own input width) and N >= 1 tokens.

Parameters live at `modality_projections/<name>/{kernel,bias}`, so
`optim.train_also=["modality_projections/.*"]` trains them beside LoRA.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kosmos_jax.models import config as config_lib
from kosmos_jax.models import layers

# The connector's and the token rows' std: an L2-normalised input (ImageBind's
# are) gives soft tokens at the scale of a token embedding row.
INIT_STD = 0.02


class ModalityProjections(nnx.Module):
  """One `layers.Dense` (width_m -> tokens * text width, with bias) per modality,
  an attribute named after it."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs, dtype, param_dtype):
    config_lib.check_modalities(config)
    self.names = config_lib.modality_names(config)
    # Tuples, not dicts: static attributes of the module.
    self.widths = tuple(config_lib.modality_widths(config).values())
    self.tokens = config_lib.modality_tokens(config)
    self.width = config.text.width
    for name, width in zip(self.names, self.widths):
      if hasattr(self, name):  # an attribute of the module itself, e.g. "names"
        raise ValueError(f"model.modalities: {name!r} is a reserved name")
      dense = layers.Dense(
        width,
        self.tokens * self.width,
        # The connector's dense layer's names: the input width whole, the
        # output split like the text width.
        axes=(None, "embed"),
        rngs=rngs,
        kernel_init=layers.normal(INIT_STD),
        dtype=dtype,
        param_dtype=param_dtype,
      )
      setattr(self, name, dense)

  def __call__(self, modality_embeds: jax.Array, modality_types: jax.Array) -> jax.Array:
    """modality_embeds [b, M, D >= each width], modality_types [b, M] (index
    into `names`, -1 = empty) -> soft tokens [b, M * tokens, text width], item
    by item. Empty items give zeros (no slot reads them)."""
    b, m = modality_types.shape
    if modality_embeds.shape[-1] < max(self.widths):
      raise ValueError(
        f"modality_embeds width {modality_embeds.shape[-1]} < the widest modality's "
        f"{max(self.widths)} ({dict(zip(self.names, self.widths))})"
      )
    out = jnp.zeros((b, m, self.tokens * self.width), getattr(self, self.names[0]).dtype)
    # Every modality's projection runs on every item (M is small) and each
    # item keeps its own modality's result: one shape, no gather of weights.
    for index, (name, width) in enumerate(zip(self.names, self.widths)):
      projected = getattr(self, name)(modality_embeds[..., :width])
      out = jnp.where((modality_types == index)[..., None], projected, out)
    return out.reshape(b, m * self.tokens, self.width)


def projections(config, *, rngs, dtype, param_dtype) -> ModalityProjections | None:
  """The model's projections, or None when `config.modalities` is empty."""
  if not config_lib.modality_names(config):
    return None
  return ModalityProjections(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def fresh_params(config, seed: int = 0) -> dict:
  """Newly initialised `modality_projections` parameters (nested dict)."""
  module = ModalityProjections(
    config,
    rngs=nnx.Rngs(seed),
    dtype=jnp.dtype(config.dtype),
    param_dtype=jnp.dtype(config.param_dtype),
  )
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def grow_params(params: dict, old_config, new_config, seed: int = 0) -> dict:
  """Parameters of a model with `old_config` extended to `new_config`'s
  modalities: the embedding keeps every row of the ids below the old tags,
  each modality keeps its tag rows and projection if it had them, and new
  tags and projections are initialised as the model initialises them (rows
  normal(0.02)), from `seed`. Raises ValueError for changes that are not
  additions (a dropped modality, a new width or token count)."""
  old_names, new_names = (
    config_lib.modality_names(old_config),
    config_lib.modality_names(new_config),
  )
  old_widths = config_lib.modality_widths(old_config)
  new_widths = config_lib.modality_widths(new_config)
  same_tokens = config_lib.modality_tokens(old_config) == config_lib.modality_tokens(new_config)
  changed = [n for n in old_names if n not in new_widths or new_widths[n] != old_widths[n]]
  if changed or (old_names and not same_tokens):
    raise ValueError(
      f"modalities {old_widths} (modality_tokens {config_lib.modality_tokens(old_config)}) "
      f"can only be extended by new names, not changed to {new_widths} "
      f"(modality_tokens {config_lib.modality_tokens(new_config)})"
    )
  embed = params["text_model"]["embed_tokens"]
  base = old_config.text.vocab_size - 2 * len(old_names)
  if embed.shape[0] != old_config.text.vocab_size:
    raise ValueError(f"embed_tokens has {embed.shape[0]} rows, config {old_config.text.vocab_size}")
  fresh_rows = layers.normal(INIT_STD)(
    jax.random.key(seed), (2 * len(new_names), embed.shape[1]), embed.dtype
  )
  rows = [embed[:base]]
  for i, name in enumerate(new_names):
    if name in old_names:
      j = base + 2 * old_names.index(name)
      rows.append(embed[j : j + 2])
    else:
      rows.append(fresh_rows[2 * i : 2 * i + 2])
  fresh = fresh_params(new_config, seed)
  old_projections = params.get("modality_projections", {})
  grown = {
    **params,
    "text_model": {**params["text_model"], "embed_tokens": jnp.concatenate(rows)},
    "modality_projections": {n: old_projections.get(n, fresh[n]) for n in new_names},
  }
  if not new_names:
    del grown["modality_projections"]
  return grown
