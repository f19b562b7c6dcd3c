"""mfu.forward_flops against XLA's own count of the image path's FLOPs."""

import os

import jax.numpy as jnp
import pytest
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.train import mfu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("connector", ["kosmos2", "perceiver"])
def test_image_path_flops_match_xla(connector):
  cfg = config_lib.load(os.path.join(ROOT, "configs/tiny.py")).model
  cfg.connector = connector
  # One layer per tower: XLA counts a scanned loop's body once, not per layer.
  cfg.vision.depth = cfg.perceiver.depth = 1
  model = Kosmos2(cfg, rngs=nnx.Rngs(0))
  size = cfg.vision.image_size
  compiled = (
    nnx.jit(lambda m, x: m.encode_images(x))
    .lower(model, jnp.zeros((1, 1, 3, size, size)))
    .compile()
  )
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  ours = mfu.forward_flops(cfg, seq_len=0, images_per_row=1)  # no text: the image path alone
  # Ours counts matmuls only; XLA adds norms, softmax and activations.
  assert 0.8 * ours <= xla <= 1.2 * ours, (xla, ours)
