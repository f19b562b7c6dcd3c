"""Kosmos-2 at the released size (microsoft/kosmos-2-patch14-224): 1.66B parameters.

ViT-L/14 at 224, a 24 x 2048 MAGNETO decoder, vocab 65037, 64 latents, trained
on the `kosmos2_pretrain` mixture of the user's files (data/README.md):

  kosmos-jax train --config configs/kosmos2.py --workdir gs://BUCKET/run \\
    --config.data.spm_model_file=PATH/sentencepiece.bpe.model --config.data.data_dir=gs://BUCKET/data

The step is planned for a v5e-16 (16 chips x 16 GiB): parameters, gradients and
AdamW moments sharded over all 16 chips (fsdp), 2 packed rows of 2048 tokens
and 16 images per chip, bfloat16 compute with float32 master weights, full
rematerialisation. `kosmos-jax aot --config configs/kosmos2.py --topology
v5e:4x4` checks it fits (numbers in README.md).
"""

from kosmos_jax.config import experiment_config
from kosmos_jax.models.config import model_config


def get_config():
  config = experiment_config(model_config(dtype="bfloat16", remat="full"))
  config.batch_size = 32  # sequences per step: 65,536 tokens
  config.seq_len = 2048
  config.images_per_row = 16
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  # Paper (reference 3.3): 60k steps, 375 warmup, lr 2e-4 decaying linearly to 0.
  config.total_steps = 60_000
  config.optim.warmup_steps = 375
  config.log_every = 50
  config.checkpoint_every = 1000
  config.data.mixture = "kosmos2_pretrain"
  return config
