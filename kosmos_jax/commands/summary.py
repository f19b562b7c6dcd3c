"""`kosmos-jax summary`: parameter counts of a config, computed without allocating.

With LoRA (`config.lora.rank > 0`) or `optim.train_also` the counts include
the adapters, and `trainable` / `optimizer_state_gib` say what a fine-tune
trains and what its optimizer keeps (two float32 moments per trainable
parameter with adamw; state exists for trainable parameters only).
"""

import json

TAKES_CONFIG = True


def add_parser(sub) -> None:
  summary = sub.add_parser(
    "summary",
    help="parameter counts of a config (no allocation); accepts --config.key=value overrides",
  )
  summary.add_argument("--config", required=True, help="configs/NAME.py")


def run(args, overrides) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax.models import build, lora  # pylint: disable=g-import-not-at-top
  from kosmos_jax.processing import views  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import optim  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config, overrides)
  if lora.enabled(config.get("lora")):
    model = lora.abstract_model(config.model, config.lora, config.seed)
  else:
    model = build.abstract_model(config.model)
  state = nnx.state(model, nnx.Param)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  params = nnx.to_pure_dict(state)
  counts = {name: size(sub) for name, sub in params.items()}
  total = sum(counts.values())
  out = {
    "config": args.config,
    "parameters": total,
    **counts,
    "float32_gib": round(total * 4 / 2**30, 3),
    "bfloat16_gib": round(total * 2 / 2**30, 3),
    # What one picture costs in the sequence and at the input (views.py).
    "picture_px": views.input_size(config.model.vision),
    "image_slots_per_picture": views.image_slots(config.model),
  }
  patterns = optim.trainable_patterns(config)
  if patterns is not None:
    trainable = size(optim.split_trainable(state, patterns)[0])
    out.update(
      adapters=size(optim.split_trainable(state, [lora.ADAPTER_PATTERN])[0])
      if lora.has_adapters(params)
      else 0,
      trainable=trainable,
      trainable_fraction=round(trainable / total, 6),
      optimizer_state_gib=round(trainable * 8 / 2**30, 4),
    )
  print(json.dumps(out))
