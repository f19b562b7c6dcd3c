"""SPHINX's high-resolution sub-image views (sphinx_pandagpt.md 1.5).

`model.vision.views = {"grid": N, "global": True}`: the picture is resized to
N x `vision.image_size` square (the processor and the tf ops do this; they
only need `input_size`), then on device `split` cuts it into N x N tiles of
the tower's size, row-major, after a global view (the whole picture
downsampled to the tower's size, bicubic with antialiasing, as SPHINX's
`llama_ens5` makes it). Global first, then the tiles, as SPHINX orders them.
Every view goes through the towers and the connector on its own and gets its
own block of `latent_query_num` slots between two learned tags (the same
start/end pair for every view; the model's `view_tags`), so a picture takes
`image_slots` slots: SPHINX-1k's N=2 is 5 views, SPHINX-2k's N=3 10.

Boxes and location tokens stay in the whole picture's frame: the picture is
only resized, never cropped, before the model sees it. The default, grid 1
without a global view, is the released model: one view, no tags.

Configs are read with `.get` and `[]` only, so the processor can pass the
model config it reads as JSON (processing sits below models).
"""

import jax
import jax.numpy as jnp


def spec(vision) -> tuple[int, bool]:
  """(grid, global view) of a `model.vision` config; configs saved before
  views existed are one view."""
  views = vision.get("views") or {}
  grid, whole = int(views.get("grid", 1)), bool(views.get("global", False))
  if grid < 1:
    raise ValueError(f"model.vision.views.grid = {grid}: expected >= 1")
  return grid, whole


def count(vision) -> int:
  """Views per picture: grid * grid tiles, plus the global view."""
  grid, whole = spec(vision)
  return grid * grid + whole


def tagged(vision) -> bool:
  """Whether each view's slots sit between view tags (any split picture)."""
  return count(vision) > 1


def input_size(vision) -> int:
  """The side the processor and the tf ops resize a picture to."""
  return spec(vision)[0] * int(vision["image_size"])


def image_slots(model) -> int:
  """Slots one picture takes in the token sequence (between `<image>` and
  `</image>`): `latent_query_num`, times the views, each with two tags."""
  latents = int(model["latent_query_num"])
  vision = model["vision"]
  return count(vision) * (latents + 2) if tagged(vision) else latents


def split(images: jax.Array, vision) -> jax.Array:
  """[n, N*S, N*S, C] pictures -> [n * views, S, S, C]: per picture the
  global view (if any), then the N x N tiles, row-major."""
  grid, whole = spec(vision)
  n, height, width, channels = images.shape
  side = int(vision["image_size"])
  if (height, width) != (grid * side, grid * side):
    raise ValueError(
      f"pictures of {height}x{width} px: model.vision.views (grid {grid}) expects "
      f"{grid * side}x{grid * side}, {grid} x image_size {side}; resize them to "
      "views.input_size (the processor and the data path do)"
    )
  tiles = images.reshape(n, grid, side, grid, side, channels).transpose(0, 1, 3, 2, 4, 5)
  tiles = tiles.reshape(n, grid * grid, side, side, channels)
  if whole:
    small = jax.image.resize(
      images.astype(jnp.float32), (n, side, side, channels), "bicubic", antialias=True
    )
    tiles = jnp.concatenate([small.astype(images.dtype)[:, None], tiles], axis=1)
  return tiles.reshape(n * count(vision), side, side, channels)


def wrap(embeds: jax.Array, tags: jax.Array, vision) -> jax.Array:
  """[n * views, latents, d] view embeddings and the [2, d] start/end tags ->
  [n, views * (latents + 2), d], each view's block between the tags."""
  views = count(vision)
  nv, latents, d = embeds.shape
  start, end = (jnp.broadcast_to(t.astype(embeds.dtype), (nv, 1, d)) for t in tags)
  blocks = jnp.concatenate([start, embeds, end], axis=1)
  return blocks.reshape(nv // views, views * (latents + 2), d)
