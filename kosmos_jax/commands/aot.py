"""`kosmos-jax aot`: compile the train step for a TPU topology here and print the plan."""

import dataclasses
import json

TAKES_CONFIG = True


def add_parser(sub) -> None:
  aot_cmd = sub.add_parser(
    "aot",
    help="compile the train step for a TPU topology here "
    "(libtpu) and print per-chip memory and FLOPs; accepts "
    "--config.key=value overrides",
  )
  aot_cmd.add_argument("--config", required=True, help="configs/NAME.py")
  aot_cmd.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5p:4x4x4, v4:2x2x4")


def run(args, overrides) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import aot  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config, overrides)
  try:
    _, report = aot.compile_train_step(config, aot.tpu_devices(args.topology), args.topology)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses plans over HBM itself; its first line says by how much.
    raise SystemExit(
      f"{args.config} {overrides} does not fit a {args.topology} chip "
      f"(GiB per chip): {str(e).splitlines()[0]}"
    ) from e
  print(
    json.dumps(
      {
        "config": args.config,
        "overrides": overrides,
        **dataclasses.asdict(report),
        "fits": report.fits(),
      }
    )
  )
  if not report.fits():
    raise SystemExit(
      f"{args.config} needs {report.total_gib} GiB per chip; "
      f"a {args.topology} chip has {report.hbm_gib} GiB"
    )
