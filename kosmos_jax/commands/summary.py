"""`kosmos-jax summary`: parameter counts of a config, computed without allocating."""

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

  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax.models import build  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config, overrides)
  params = build.abstract_params(config.model)
  counts = {name: sum(x.size for x in jax.tree.leaves(sub)) for name, sub in params.items()}
  total = sum(counts.values())
  print(
    json.dumps(
      {
        "config": args.config,
        "parameters": total,
        **counts,
        "float32_gib": round(total * 4 / 2**30, 3),
        "bfloat16_gib": round(total * 2 / 2**30, 3),
      }
    )
  )
