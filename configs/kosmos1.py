"""KOSMOS-1 (arXiv 2302.14045, reference/kosmos2.md 3.4): 1.73B parameters.

A 24 x 2048 MAGNETO decoder (FFN 8192, 32 heads) with xPos relative
positions, CLIP ViT-L/14 at 224 frozen except its last block, and 64 image
embeddings through a Perceiver resampler, trained on the user's files
(data/README.md) with KOSMOS-1's token shares (`kosmos2_kosmos1_pretrain`:
text, image-caption and interleaved documents, no GrIT):

  kosmos-jax train --config configs/kosmos1.py --workdir gs://BUCKET/run \\
    --config.data.spm_model_file=PATH/sentencepiece.bpe.model --config.data.data_dir=gs://BUCKET/data

Planned for a v5p-128 slice (64 chips): 576 packed rows of 2048 tokens per
step (1.18M tokens, the paper's ~1.2M), fsdp 16 x tensor 4, bfloat16 compute,
full rematerialisation. `kosmos-jax aot --config configs/kosmos1.py
--topology v5p:4x4x4` checks it fits (numbers in README.md).

Choices the paper leaves open (its size tables are images in the available
copies): the vocabulary is Kosmos-2's 65,037 ids (the paper's is derived to be
64,007; the 1,030 location ids cost 2.1M parameters and let one tokenizer and
data path serve both models); the resampler has 2 layers of 16 heads x 64
(86M parameters): the paper's "about 1.6B" in all leaves room for a small one
(6 layers would make 1.90B).
"""

from kosmos_jax.config import experiment_config
from kosmos_jax.models.config import model_config


def get_config():
  model = model_config(
    **{"text.position": "xpos", "connector": "perceiver", "dtype": "bfloat16", "remat": "full"}
  )
  model.perceiver.update(depth=2, heads=16, head_dim=64, ffn_mult=4)
  config = experiment_config(model)
  config.batch_size = 576  # sequences per step: 1,179,648 tokens
  config.seq_len = 2048
  config.images_per_row = 16
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 16, 4
  # Paper: 300k steps, lr 2e-4, 375 warmup, linear decay, AdamW (0.9, 0.98),
  # weight decay 0.01, dropout 0.1 (the optim and model defaults).
  config.total_steps = 300_000
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 375
  # CLIP frozen except its last block (and the LayerNorm after it, which only
  # that block feeds).
  config.optim.freeze = ["vision_model/(?!layers/|post_layernorm/).*", "vision_model/layers/.*@:-1"]
  config.log_every = 50
  config.checkpoint_every = 1000
  config.data.mixture = "kosmos2_kosmos1_pretrain"
  return config
