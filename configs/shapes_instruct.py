"""Fine-tune `make demo`'s model on the shapes world's task-prompted instructions (SPHINX).

  make demo   # writes demo_out/train, the checkpoint this starts from
  kosmos-jax train --config configs/shapes_instruct.py --workdir runs/shapes_instruct

Data (`data.shapes_instruct`, kosmos_jax/data/shapes_instruct.py): 1000
training and 100 held-out pictures of the demo's 64 px shapes world, written
on first use into the cache, as four conversation tasks, each with its own
task prompt (kosmos_jax/data/task_prompts.json): vqa (colour, kind,
position, count), rec (expression -> `<phrase>..</phrase><box>`), reg (box ->
expression) and grounded_caption. `data.conversation_mixture` mixes them,
SPHINX-style one task per batch, by rate: vqa 2 (its answers are the new
skill), the others 1. The vocabulary is the demo's (the shapes sentencepiece
model, 16 x 16 location grid; a trainer workdir names none).

Optimisation: the demo trained from scratch at 5e-4; a fine-tune keeps to a
fifth of it, 1e-4 after 20 warmup steps, linear decay, 300 steps of 8
sequences. Rows of 256 tokens (the demo's `text.max_positions`) hold two or
three records: 16 slots + a prompt the shapes vocabulary spells mostly
letter by letter (about 60-90 tokens). The held-out loss is logged every
100 steps.
"""

from kosmos_jax.config import experiment_config
from kosmos_jax.data import shapes_instruct
from kosmos_jax.models.config import model_config

RATES = dict(vqa=2.0, rec=1.0, reg=1.0, grounded_caption=1.0)


def get_config():
  # The model (shape and weights) is init_from's; this sets only the numerics.
  config = experiment_config(model_config())
  config.init_from = "demo_out/train"
  folder = shapes_instruct.default_dir(64)
  config.data.shapes_instruct = dict(
    directory=folder, image_size=64, num_train=1000, num_validation=100
  )
  train = shapes_instruct.files(folder, "train")
  held_out = shapes_instruct.files(folder, "validation")
  config.data.conversation_mixture = dict(
    name="shapes_instruct",
    one_task_per_batch=True,
    prompts_file="",
    tasks={
      task: dict(files=train[task], validation_files=held_out[task], template=task, rate=rate)
      for task, rate in RATES.items()
    },
  )
  config.data.mixture = "shapes_instruct"
  config.data.spm_model_file = shapes_instruct.spm_model_file()
  config.data.autotune = False  # a small CPU run (data/loader.py)
  config.batch_size = 8
  config.seq_len = 256
  config.images_per_row = 4
  config.total_steps = 300
  config.log_every = 25
  config.checkpoint_every = 300
  config.eval_every = 100
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 0.0
  return config
