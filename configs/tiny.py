"""A Kosmos-2 small enough for fast CPU tests: the same architecture, tiny sizes."""

from kosmos_jax.config import experiment_config
from kosmos_jax.models.config import model_config


def get_config():
  config = experiment_config(
    model_config(
      **{
        "vision.image_size": 32,
        "vision.patch_size": 8,
        "vision.width": 32,
        "vision.depth": 2,
        "vision.heads": 4,
        "vision.mlp_dim": 64,
        "text.vocab_size": 1200,
        "text.width": 64,
        "text.depth": 2,
        "text.heads": 4,
        "text.ffn_dim": 128,
        "text.max_positions": 256,
        "latent_query_num": 8,
      }
    )
  )
  config.data.mixture = "shapes32_mix"  # 32 px pictures, 8 image slots
  config.evaluators.rec = dict(
    task="seqio_rec", seqio_task="shapes32_rec", split="validation", num=100, batch_size=64
  )
  config.batch_size = 8
  config.seq_len = 128
  config.total_steps = 20
  config.log_every = 5
  config.checkpoint_every = 10
  config.optim.warmup_steps = 5
  return config
