"""`kosmos-jax mix`: SPHINX's weight mix, `beta * A + (1 - beta) * B` of two
checkpoints of one model, written tensor by tensor (checkpoints/mix.py)."""

import json


def add_parser(sub) -> None:
  mix = sub.add_parser(
    "mix", help="beta * A + (1 - beta) * B of two checkpoints (SPHINX's weight mix)"
  )
  mix.add_argument(
    "--checkpoint",
    action="append",
    default=[],
    help="A, then B: converted checkpoints or trainer workdirs (WORKDIR or WORKDIR@STEP)",
  )
  mix.add_argument("--beta", type=float, required=True, help="A's weight, in [0, 1]")
  mix.add_argument("--out", required=True, help="checkpoint directory to write")
  mix.add_argument(
    "--only",
    action="append",
    default=[],
    metavar="PATTERN",
    help="mix only the parameters this regex matches whole (e.g. 'text_model/.*'); "
    "the rest are A's; repeatable",
  )
  mix.add_argument("--extrapolate", action="store_true", help="accept a beta outside [0, 1]")


def run(args, overrides) -> None:
  del overrides
  if len(args.checkpoint) != 2:
    raise SystemExit(f"--checkpoint: give it twice, A then B (got {len(args.checkpoint)})")
  from kosmos_jax.checkpoints import mix  # pylint: disable=g-import-not-at-top

  a, b = args.checkpoint
  result = mix.mix(a, b, args.out, args.beta, only=args.only, extrapolate=args.extrapolate)
  print(json.dumps(result))
