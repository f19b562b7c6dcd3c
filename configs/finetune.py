"""Fine-tune the released Kosmos-2 (or any checkpoint of ours) on your own files.

  kosmos-jax train --config configs/finetune.py --workdir runs/mine \\
    --config.init_from=kosmos-2-patch14-224 \\
    --config.data.conversations.files='my_data/train/*.jsonl' \\
    --config.data.conversations.validation_files='my_data/val/*.jsonl'

The model is `init_from`'s: its shape and weights come from the directory (a
Hugging Face snapshot, a `kosmos-jax convert` checkpoint or a trainer workdir);
`config.model` sets only the numerics (dtype, param_dtype, remat, attention)
and the soft-token modalities to add (configs/finetune_modalities.py). The
vocabulary is the snapshot's `sentencepiece.bpe.model` unless
`data.spm_model_file` names one. Dropout stays as released (0.1).

Data: conversation JSON lines (data/conversations.py: an image or several, multi-turn,
the model's tags and `<box>` markers allowed), the loss on the assistant's
answers and their `</s>` only; `kosmos-jax data inspect` shows which tokens
carry it. Grounded image-text records (GrIT style) train through the
`kosmos2_grit` task instead (data/README.md).

Defaults: peak learning rate 2e-5 (SPHINX's fine-tuning rate; the paper's
pretraining 2e-4 would overwrite the release in a few hundred steps), 50
warmup steps then linear decay to 0, no weight decay, 1000 steps: set
`total_steps` to epochs x examples / batch_size. Rows of 1024 tokens hold
about six one-picture conversations (64 slots + ~100 words each), hence 8
pictures per row. The held-out loss is logged every `eval_every` steps; for
grounding or REC data add an evaluator, e.g.
`--config.evaluators='{"refcocog": {"task": "refcocog", "annotations":
"mdetr/finetune_refcocog_val.json", "image_dir": "coco/train2014", "num": 500}}'`.

LoRA instead of a full fine-tune: `--config.lora.rank=16` (0.38% of the
parameters train; `kosmos-jax summary --config configs/finetune.py
--config.lora.rank=16`), and `--config.optim.learning_rate=2e-4`, the usual
LoRA rate.
"""

from kosmos_jax.config import experiment_config
from kosmos_jax.models.config import model_config


def get_config():
  config = experiment_config(model_config(dtype="bfloat16", remat="full"))
  config.init_from = "kosmos-2-patch14-224"
  config.batch_size = 32
  config.seq_len = 1024
  config.images_per_row = 8
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  config.total_steps = 1000
  config.log_every = 10
  config.checkpoint_every = 250
  config.eval_every = 100
  config.optim.learning_rate = 2e-5
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.0
  config.data.conversations = dict(files="", validation_files="", strict=False)
  config.data.mixture = "conversations"
  return config
