"""PandaGPT's recipe on Kosmos-2: other modalities as projected soft tokens.

  kosmos-jax train --config configs/finetune_modalities.py --workdir runs/audio \\
    --config.init_from=kosmos-2-patch14-224 \\
    --config.data.conversations.files='audio_chat/train.jsonl'

Each modality (`model.modalities`: name -> width of its precomputed vectors;
here ImageBind-huge's 1024-d audio, video, depth, thermal and IMU embeddings)
gets its own learned projection to `model.modality_tokens` soft tokens,
placed at `<audio>`-style slots of the conversation lines (`"audio":
"clip.npy"` or an inline list per placeholder; data/conversations.py). The
tags are appended to the released vocabulary (65,037 ids unchanged); their
new embedding rows stay at their random init, distinct markers the LoRA
layers learn to read, as PandaGPT's frozen embedding keeps its `<Img>` marker.

As PandaGPT trains: the decoder frozen but for LoRA on its q, k, v and out
projections (rank 32, alpha 32, dropout 0.1), the projections trained in full
(`optim.train_also`), lr 5e-4 with a 10% warmup, Adam betas (0.9, 0.95),
weight decay 0.001, clip 1.0 (reference sphinx_pandagpt.md 2.2-2.3). The
vision tower and connector stay frozen: pictures still work as released.
"""

from configs import finetune
from kosmos_jax.models.config import with_modalities


def get_config():
  config = finetune.get_config()
  widths = dict(audio=1024, video=1024, depth=1024, thermal=1024, imu=1024)
  # Grows text.vocab_size by the tags; with init_from the trainer applies
  # the same to the checkpoint's config.
  config.model = with_modalities(config.model, widths, 4)
  config.data.modalities_per_row = 8  # as images_per_row: ~6 conversations a row
  config.lora.rank, config.lora.alpha, config.lora.dropout = 32, 32.0, 0.1
  config.optim.train_also = ["modality_projections/.*"]
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = config.total_steps // 10
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.001
  config.optim.clip_norm = 1.0
  return config
