"""The model's hyperparameters: the one home of the released Kosmos-2 shape.

`configs/*.py` build on `model_config()`; the Hugging Face converter maps
`config.json` to and from it. Numbers are from reference/kosmos2.md 1.1.
"""

import copy
import re

import ml_collections


def model_config(**overrides) -> ml_collections.ConfigDict:
  """Kosmos-2 (microsoft/kosmos-2-patch14-224) model config; dotted overrides."""
  c = ml_collections.ConfigDict()
  c.vision = dict(
    image_size=224,
    patch_size=14,
    num_channels=3,
    width=1024,
    depth=24,
    heads=16,
    mlp_dim=4096,
    activation="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    # "normal": std 0.02, as released. "sincos2d": the 2-D sine-cosine table
    # of the patch grid (CLS row zero), still trained: for training from
    # scratch, where the std-0.02 table leaves every patch nearly blind to
    # where it is (see vit.sincos2d).
    position_init="normal",
    # Side of the learned position table's patch grid; None: image_size //
    # patch_size. A checkpoint run at another image_size keeps its table
    # (from_pretrained pins this) and the ViT resizes it bicubically at
    # forward time, as transformers' interpolate_pos_encoding=True does
    # (vit.position_grid).
    position_grid=None,
    # SPHINX's sub-image views (processing/views.py): the picture at grid x
    # image_size, cut into grid x grid tiles, with a downsampled whole view
    # first when "global"; each view its own slot block between learned
    # tags. {"grid": 2, "global": True}: SPHINX-1k's 5 views. The default is
    # the released model's single view.
    views={"grid": 1, "global": False},
  )
  c.text = dict(
    vocab_size=65037,
    width=2048,
    depth=24,
    heads=32,
    ffn_dim=8192,
    max_positions=2048,
    # Decoder positions. "sinusoidal": fairseq's absolute table added to the
    # embeddings (Kosmos-2, transformers parity). "xpos": KOSMOS-1's xPos,
    # relative, rotating q and k in every layer (models/xpos.py); no
    # Hugging Face twin, so the converter refuses it.
    position="sinusoidal",
    activation="gelu",
    layer_norm_eps=1e-5,
    scale_embedding=True,
    pad_id=1,
    bos_id=0,
    eos_id=2,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    # The location tokens are the last P x P ids, `<patch_index_k>` for
    # k = row * P + column (reference/kosmos2.md 2.1).
    num_patches_per_side=32,
    # Their embedding rows (tied to the LM head). "normal": std 0.02 like
    # every row, as released. "sincos2d", for training from scratch: the 2-D
    # sine-cosine table of the P x P grid at the same std, so neighbouring
    # cells start with similar embeddings and logits and a box learned in
    # one cell teaches its neighbours (TextDecoder).
    location_init="normal",
  )
  c.latent_query_num = 64
  # Connector init. "hf": transformers' (std 0.02 projections, std-1 latent
  # queries). "scaled", for training from scratch: std 1 for the dense layer
  # (its input is L2-normalised, so unit-scale outputs), 2/sqrt(width) for q/k
  # and 1/sqrt(width) for v, std-1 latents: the image tokens make up the slots
  # from the first step and the latents' distinct queries let each slot learn
  # its own part of the picture (connector.INITS).
  c.connector_init = "hf"
  # Image-to-text connector, both with `latent_query_num` latents. "kosmos2":
  # the released one-layer cross-attention (connector.py; transformers
  # parity, the only one the Hugging Face converter takes). "perceiver":
  # Flamingo's Perceiver resampler (resampler.py; its own init, not
  # `connector_init`), KOSMOS-1's "Resampler".
  c.connector = "kosmos2"
  c.perceiver = dict(
    depth=6,  # resampler layers (scanned, like the decoder's)
    heads=8,  # attention heads over [image tokens; latents]
    head_dim=64,  # width of each head; heads * head_dim need not be text.width
    ffn_mult=4,  # FFN hidden width = ffn_mult * text.width
  )
  # Other modalities as PandaGPT-style soft tokens (models/modalities.py):
  # name -> width of its precomputed vector (e.g. {"sound": 1024} for
  # ImageBind audio embeddings). Each item becomes `modality_tokens` soft
  # tokens through its modality's own learned projection, spliced where the
  # slot mask is 2. A modality's type id and tag order are its index in
  # sorted(names) (`modality_names`). Its tags `<name>`, `</name>` need two
  # text rows each after the location tokens: set modalities with
  # `with_modalities`, which grows `text.vocab_size`; empty = none.
  c.modalities = {}
  c.modality_tokens = 4  # soft tokens per modality item (PandaGPT: 1)
  # SPHINX's visual encoder mix (models/mixing.py): towers beside the CLIP
  # ViT, name -> tower config (models/towers.py dinov2_config / siglip_config / vit_config,
  # models/convnext.py, models/qformer.py; optional `mean`, `std` of its
  # input and, for a Q-Former, `input`: the tower it reads). Empty: the
  # released model.
  c.towers = {}
  # Numerics and memory: float32/bfloat16 compute, float32 master weights.
  c.dtype = "float32"
  c.param_dtype = "float32"
  c.remat = "none"  # See layers.REMAT_POLICIES.
  c.attention = "xla"  # See attention.IMPLEMENTATIONS.
  # MAGNETO init (reference 1.5) for training from scratch; off = HF init.
  c.magneto_init = True
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    if leaf not in target:
      raise KeyError(f"unknown model config key {key!r}")
    target[leaf] = value
  return c


# Specials, <mask> and the 11 tags: the ids below the location tokens that
# any KOSMOS vocabulary has besides its sentencepiece pieces
# (processing/vocab.py).
_FIXED_IDS = 4 + 1 + 11


def modality_names(config) -> tuple[str, ...]:
  """The model's modalities in type-id and tag order; () for configs saved
  before the key."""
  return tuple(sorted(config.get("modalities") or {}))


def modality_widths(config) -> dict[str, int]:
  """name -> vector width, in `modality_names` order."""
  widths = config.get("modalities") or {}
  return {name: int(widths[name]) for name in modality_names(config)}


def modality_tokens(config) -> int:
  return int(config.get("modality_tokens", 4))


def first_location_id(config) -> int:
  """`<patch_index_0000>`'s id: the P * P location tokens come right before
  the modalities' tag rows, which end the vocabulary."""
  text = config.text
  return text.vocab_size - 2 * len(modality_names(config)) - text.num_patches_per_side**2


def check_modalities(config) -> None:
  """A clear ValueError for modality settings no vocabulary can hold."""
  for name, width in (config.get("modalities") or {}).items():
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("image", "phrase", "object"):
      raise ValueError(
        f"model.modalities: name {name!r} must be lowercase letters, digits and _, "
        "and not a KOSMOS tag name"
      )
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
      raise ValueError(f"model.modalities[{name!r}] = {width!r}: expected a positive int width")
  if modality_tokens(config) < 1:
    raise ValueError(f"model.modality_tokens = {modality_tokens(config)}: expected >= 1")
  text = config.text
  needed = _FIXED_IDS + text.num_patches_per_side**2 + 2 * len(modality_names(config))
  if text.vocab_size < needed:
    raise ValueError(
      f"model.text.vocab_size {text.vocab_size} is too small: the location tokens, "
      f"specials, tags and the tags of modalities {list(modality_names(config))} "
      f"alone take {needed} ids; set modalities with models.config.with_modalities, "
      "which grows the vocabulary"
    )


def with_modalities(
  config: ml_collections.ConfigDict, modalities: dict[str, int], tokens: int | None = None
) -> ml_collections.ConfigDict:
  """A copy of `config` with `modalities` (name -> width) and, if given,
  `tokens` soft tokens per item; `text.vocab_size` grows by two rows (the
  tags) per modality beyond those the config already has, so the released
  ids keep their rows and the tags are the last rows."""
  # A deep copy keeps the config's field references (e.g. `attention`).
  frozen = isinstance(config, ml_collections.FrozenConfigDict)
  config = ml_collections.ConfigDict(config) if frozen else copy.deepcopy(config)
  base = config.text.vocab_size - 2 * len(modality_names(config))
  config.modalities = {name: int(width) for name, width in modalities.items()}
  if tokens is not None:
    config.modality_tokens = int(tokens)
  config.text.vocab_size = base + 2 * len(config.modalities)
  check_modalities(config)
  return config
