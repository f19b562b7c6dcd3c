"""A synthetic "sound" modality for the shapes world (PandaGPT's idea, tested here).

Each colour of the shapes world has a fixed random vector, its "sound"
(`SOUND_WIDTH` wide, unit-variance entries, from `seed`); an example's sound
is its colour's vector plus fresh Gaussian noise. Conversations ask for the
colour from the sound alone, in the conversation format (data/conversations.py):

  {"sound": [64 floats],
   "conversations": [{"from": "human", "value": "<sound> What colour makes this sound?"},
                     {"from": "gpt", "value": "red"}]}

A model that names the colour of held-out noise draws has learned to read the
projected soft tokens: no image, no text cue says which colour it is.
"""

import json
import os

import numpy as np

from kosmos_jax.data import shapes

SOUND_WIDTH = 64
QUESTION = "<sound> What colour makes this sound?"


def colour_sounds(seed: int = 0) -> dict[str, np.ndarray]:
  """colour -> its fixed sound, [SOUND_WIDTH] float32."""
  rng = np.random.default_rng(seed)
  return {c: rng.standard_normal(SOUND_WIDTH).astype(np.float32) for c in shapes.COLOURS}


def examples(
  num: int, draw_seed: int, noise: float = 0.5, seed: int = 0
) -> list[tuple[str, np.ndarray]]:
  """`num` (colour, sound) pairs, colours in turn, noise from `draw_seed`:
  training and held-out sets differ only in their noise draws."""
  sounds, rng = colour_sounds(seed), np.random.default_rng(draw_seed + 1000)
  colours = list(sounds)
  out = []
  for i in range(num):
    colour = colours[i % len(colours)]
    noisy = sounds[colour] + noise * rng.standard_normal(SOUND_WIDTH).astype(np.float32)
    out.append((colour, noisy))
  return out


def write_conversations(path: str, num: int, draw_seed: int, noise: float = 0.5) -> str:
  """Writes `num` sound conversations as JSON lines at `path`; returns it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for colour, sound in examples(num, draw_seed, noise):
      turns = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": colour}]
      f.write(json.dumps({"sound": [round(float(v), 5) for v in sound], "conversations": turns}))
      f.write("\n")
  return path
