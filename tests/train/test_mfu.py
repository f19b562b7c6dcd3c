"""mfu.forward_flops against XLA's own count of the image path's FLOPs."""

import os

import jax.numpy as jnp
import pytest
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.models import convnext, qformer, towers
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.processing import views
from kosmos_jax.train import mfu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sphinx_1k(cfg):
  """Every kind of extra tower (one layer or block per stage), a Q-Former on an
  EVA tower of its own, and 2 x 2 views.
  The towers read the tiles at their own size and there is no global view:
  XLA counts a resize's weights as matmul FLOPs, which the model's count
  leaves out (they are the input's preparation)."""
  vit = dict(width=32, depth=1, heads=2, mlp_dim=64, image_size=32, patch_size=8)
  cfg.towers = {
    "dino": towers.dinov2_config("S/14", **vit),
    "sig": towers.siglip_config("B/16", **vit),
    "conv": convnext.convnext_config(
      "tiny", depths=(1, 1), hidden_sizes=(16, 32), image_size=32, patch_size=4
    ),
    "eva": towers.eva_config(**vit, channel_mix=False),  # feeds the Q-Former only
    "q": qformer.qformer_config(
      width=32, depth=2, heads=2, mlp_dim=64, encoder_hidden_size=32, num_query_tokens=4
    ),
  }
  cfg.towers.q.input = "eva"
  cfg.vision.views = {"grid": 2, "global": False}


@pytest.mark.parametrize("connector", ["kosmos2", "perceiver", "sphinx_1k"])
def test_image_path_flops_match_xla(connector):
  cfg = config_lib.load(os.path.join(ROOT, "configs/tiny.py")).model
  if connector == "sphinx_1k":
    _sphinx_1k(cfg)
  else:
    cfg.connector = connector
  # One layer per tower: XLA counts a scanned loop's body once, not per layer.
  cfg.vision.depth = cfg.perceiver.depth = 1
  model = Kosmos2(cfg, rngs=nnx.Rngs(0))
  size = views.input_size(cfg.vision)
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
