"""Kosmos-2 at the released size (microsoft/kosmos-2-patch14-224): 1.66B parameters.

ViT-L/14 at 224, a 24 x 2048 MAGNETO decoder, vocab 65037, 64 image latents.
"""
from kosmos_jax.config import experiment_config
from kosmos_jax.models.config import model_config


def get_config():
  return experiment_config(model_config())
