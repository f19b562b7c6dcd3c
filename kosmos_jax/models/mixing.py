"""SPHINX's mix of visual encoders in front of the connector (sphinx_pandagpt.md 1.4).

`model.towers` (name -> tower config) adds towers beside the CLIP ViT
(`vision_model`, unchanged, so released weights and the Hugging Face key map
still apply). Each tower sees the picture resized to its own `image_size`
and normalised with its own `mean`/`std` (the processor normalises for CLIP;
the mix undoes that and applies the tower's), then:

  grid towers (dinov2, siglip, vit, eva, convnext)  their tokens are laid out
      as CLIP's, [1 + g * g, width] for CLIP's g x g patch grid: a class
      token (the tower's own, or the mean of its grid tokens where it has
      none, as SPHINX prepends to ConvNeXt's map), then the grid resized to
      g x g (nearest, as SPHINX upsamples ConvNeXt's 8 x 8 map to 16 x 16).
      CLIP's tokens and theirs are concatenated on the channel axis, then one
      Dense + LayerNorm maps them to the text width: SPHINX's "channel mix".
      A grid tower with `channel_mix=False` is left out of that
      concatenation: it runs only to feed a Q-Former, which reads its own
      tokens as they come (no re-layout, so any grid; SPHINX concatenates
      CLIP, ConvNeXt and DINOv2, and BLIP-2's EVA ViT-g feeds its Q-Former
      only).
  qformer  BLIP-2's Q-Former reads the tokens of the tower named by its
      `input` ("clip" or a grid tower; SPHINX's reads BLIP-2's own EVA ViT-g,
      an "eva" grid tower with channel_mix False) and gives
      `num_query_tokens` tokens, with a Dense + LayerNorm of their own; they
      go before the grid tokens in the sequence: the "spatial mix".

The connector then reads [query tokens; grid tokens] at the text width and
makes the image slots as before. Names are sorted (concatenation and
parameter order); parameters live under `towers/<name>` and `tower_mix/`, so
freeze patterns such as "towers/.*" select them.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from kosmos_jax.models import convnext, layers, qformer, towers

GRID_KINDS = ("dinov2", "siglip", "vit", "eva", "convnext")
QUERY_KINDS = ("qformer",)
# The processor's normalisation (CLIP's), undone before each tower's own.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Each kind's usual input normalisation, where its config names none
# (`mean`, `std`): DINOv2 ImageNet's, SigLIP and ViT [-1, 1] (big_vision's
# value_range(-1, 1); transformers' ViTImageProcessor the same), SPHINX's
# ConvNeXt (open_clip's convnext_xxlarge) and BLIP-2's EVA (its
# BlipImageProcessor: OpenAI CLIP's mean/std) CLIP's.
NORMALISATION = {
  "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
  "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
  "eva": (CLIP_MEAN, CLIP_STD),
  "convnext": (CLIP_MEAN, CLIP_STD),
}


def names(config) -> tuple[str, ...]:
  return tuple(sorted(config.get("towers") or {}))


def _build(cfg, kw):
  if cfg.kind in ("dinov2", "siglip", "vit", "eva"):
    return towers.VisionTower(cfg, **kw)
  if cfg.kind == "convnext":
    return convnext.ConvNeXt(cfg, **{k: v for k, v in kw.items() if k != "attention"})
  if cfg.kind == "qformer":  # 32 queries: unrolled, plain attention (qformer.py)
    return qformer.QFormer(cfg, **{k: v for k, v in kw.items() if k not in ("attention", "remat")})
  raise ValueError(f"model.towers: unknown tower kind {cfg.kind!r}")


def out_width(cfg) -> int:
  """The channels a tower's tokens have."""
  if cfg.kind == "convnext":
    return cfg.hidden_sizes[-1]
  return cfg.width  # the ViT towers and the Q-Former


def channel_towers(config) -> list[str]:
  """The grid towers concatenated with CLIP's tokens, in order."""
  return [
    n
    for n in names(config)
    if config.towers[n].kind in GRID_KINDS and config.towers[n].get("channel_mix", True)
  ]


def _query_inputs(config) -> set[str]:
  return {
    config.towers[n].get("input", "clip")
    for n in names(config)
    if config.towers[n].kind in QUERY_KINDS
  }


def check(config) -> None:
  """A clear ValueError for a mix that cannot be wired."""
  for name in names(config):
    cfg = config.towers[name]
    if cfg.kind not in GRID_KINDS + QUERY_KINDS:
      raise ValueError(
        f"model.towers.{name}: kind {cfg.kind!r} is not one of {GRID_KINDS + QUERY_KINDS}"
      )
    if cfg.kind in QUERY_KINDS:
      source = cfg.get("input", "clip")
      if source != "clip" and (
        source not in config.towers or config.towers[source].kind not in GRID_KINDS
      ):
        raise ValueError(
          f"model.towers.{name}.input {source!r}: expected 'clip' or a grid tower's name"
        )
      width = config.vision.width if source == "clip" else out_width(config.towers[source])
      if cfg.encoder_hidden_size != width:
        raise ValueError(
          f"model.towers.{name}.encoder_hidden_size {cfg.encoder_hidden_size} != "
          f"the width {width} of its input {source!r}"
        )
    elif cfg.kind in GRID_KINDS and not cfg.get("channel_mix", True):
      if name not in _query_inputs(config):  # it would run for nothing
        raise ValueError(
          f"model.towers.{name}: channel_mix False, but no Q-Former reads it "
          f"(set a qformer tower's input to {name!r}, or channel_mix True)"
        )


class Towers(nnx.Module):
  """The extra towers, one attribute each (parameter paths `towers/<name>/...`)."""

  def __init__(self, config, kw):
    for name in names(config):
      setattr(self, name, _build(config.towers[name], kw))


class TowerMix(nnx.Module):
  """Channel-mix projection of CLIP's and the channel-mixed grid towers'
  tokens, and one projection per query tower."""

  def __init__(self, config, *, rngs, dtype, param_dtype):
    # std 0.02 as the connector's "hf" init; LayerNorm eps 1e-5 as torch's
    # nn.LayerNorm in SPHINX's `visual_proj`.
    kw = dict(rngs=rngs, kernel_init=layers.normal(0.02), dtype=dtype, param_dtype=param_dtype)
    norm = dict(axis_name="embed", eps=1e-5, dtype=dtype, param_dtype=param_dtype)
    width = config.text.width
    grid = channel_towers(config)
    channels = config.vision.width + sum(out_width(config.towers[n]) for n in grid)
    self.channel = layers.Dense(channels, width, axes=(None, "embed"), **kw)
    self.channel_norm = layers.LayerNorm(width, **norm)
    for n in names(config):
      if config.towers[n].kind in QUERY_KINDS:
        setattr(
          self,
          f"{n}_proj",
          layers.Dense(out_width(config.towers[n]), width, axes=(None, "embed"), **kw),
        )
        setattr(self, f"{n}_norm", layers.LayerNorm(width, **norm))


def tower_pixels(images: jax.Array, cfg) -> jax.Array:
  """CLIP-normalised NHWC pictures -> the tower's size and normalisation."""
  mean, std = NORMALISATION[cfg.kind]
  mean, std = cfg.get("mean", mean), cfg.get("std", std)
  x = images.astype(jnp.float32) * jnp.asarray(CLIP_STD) + jnp.asarray(CLIP_MEAN)
  x = (x - jnp.asarray(mean)) / jnp.asarray(std)
  n, h, w, c = x.shape
  if (h, w) != (cfg.image_size, cfg.image_size):
    x = jax.image.resize(x, (n, cfg.image_size, cfg.image_size, c), "bilinear", antialias=True)
  return x.astype(images.dtype)


def clip_layout(tokens: jax.Array, cfg, grid: int) -> jax.Array:
  """A grid tower's output -> [n, 1 + grid * grid, width] (module doc)."""
  if cfg.kind == "convnext":  # [n, h, w, c] feature map
    n, h, w, c = tokens.shape
    cls, patches = tokens.mean(axis=(1, 2))[:, None], tokens
  else:
    has_cls = cfg.get("class_token", False)
    cls = tokens[:, :1] if has_cls else tokens.mean(axis=1, keepdims=True)
    patches = tokens[:, 1:] if has_cls else tokens
    n, count, c = patches.shape
    h = w = int(round(count**0.5))
    patches = patches.reshape(n, h, w, c)
  if grid % h or grid % w:
    raise ValueError(
      f"a {cfg.kind} tower's {h}x{w} grid does not divide CLIP's {grid}x{grid}: "
      "choose its image_size so that it does"
    )
  patches = jnp.repeat(jnp.repeat(patches, grid // h, axis=1), grid // w, axis=2)
  return jnp.concatenate([cls, patches.reshape(n, grid * grid, c)], axis=1)


def mix(config, extra: Towers, proj: TowerMix, images: jax.Array, clip: jax.Array) -> jax.Array:
  """[n, 1 + g*g, vision width] CLIP tokens (as the connector reads them) and
  the NHWC pictures -> [n, queries + 1 + g*g, text width] for the connector."""
  grid = int(round((clip.shape[1] - 1) ** 0.5))
  outputs = {"clip": clip}
  for name in names(config):
    cfg = config.towers[name]
    if cfg.kind in GRID_KINDS:
      out = getattr(extra, name)(tower_pixels(images, cfg))
      if cfg.get("channel_mix", True):
        outputs[name] = clip_layout(out, cfg, grid)
      else:  # a Q-Former's input only: the tower's own tokens, any grid (a map flattened)
        outputs[name] = out.reshape(out.shape[0], -1, out.shape[-1])
  grid_tokens = [clip] + [outputs[n].astype(clip.dtype) for n in channel_towers(config)]
  x = proj.channel_norm(proj.channel(jnp.concatenate(grid_tokens, axis=-1)))
  queries = []
  for name in names(config):
    cfg = config.towers[name]
    if cfg.kind in QUERY_KINDS:
      q = getattr(extra, name)(outputs[cfg.get("input", "clip")])
      queries.append(getattr(proj, f"{name}_norm")(getattr(proj, f"{name}_proj")(q)))
  return jnp.concatenate([*queries, x], axis=1) if queries else x
