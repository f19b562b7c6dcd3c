"""`kosmos-jax demo`: train configs/shapes.py from scratch on CPU and show what it learned."""

import time

# The demo's clock starts with the command, before JAX and TensorFlow load
# (about 5 s of its wall time): the budget is for the whole `make demo`.
STARTED = time.perf_counter()

TAKES_CONFIG = True
USES_TENSORFLOW = True  # seqio tasks, the vocabulary
KEEPS_FREED_MEMORY = True


def add_parser(sub) -> None:
  demo_cmd = sub.add_parser(
    "demo",
    help="train configs/shapes.py from scratch on CPU, score "
    "referring expressions on held-out pictures, draw boxes; accepts "
    "--config.key=value overrides",
  )
  demo_cmd.add_argument("--config", default="configs/shapes.py", help="configs/NAME.py")
  demo_cmd.add_argument("--out", default="demo_out", help="pictures, summary.json, train/")
  demo_cmd.add_argument("--pictures", type=int, default=8, help="held-out pictures to draw")
  demo_cmd.add_argument(
    "--benchmark-pictures",
    type=int,
    default=100,
    help="held-out pictures exported per benchmark format and scored",
  )
  demo_cmd.add_argument(
    "--naming-pictures",
    type=int,
    default=100,
    help="held-out single-shape pictures named zero-shot and two-shot",
  )


def run(args, overrides) -> None:
  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax import demo  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config, overrides)
  summary = demo.run(
    config,
    args.out,
    pictures=args.pictures,
    benchmark_pictures=args.benchmark_pictures,
    naming_pictures=args.naming_pictures,
    started=STARTED,
  )
  print(demo.describe(summary, args.out))
