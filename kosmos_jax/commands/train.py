"""`kosmos-jax train`: the sharded trainer; resumes from the latest checkpoint in --workdir."""

import json

TAKES_CONFIG = True
USES_TENSORFLOW = True  # seqio tasks, the vocabulary
KEEPS_FREED_MEMORY = True


def add_parser(sub) -> None:
  train = sub.add_parser(
    "train",
    help="train (resumes from the latest checkpoint in --workdir); "
    "accepts --config.key=value overrides",
  )
  train.add_argument("--config", required=True, help="configs/NAME.py")
  train.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard")
  train.add_argument(
    "--multihost",
    action="store_true",
    help="jax.distributed.initialize() (automatic on Cloud TPU pods)",
  )
  train.add_argument("--coordinator", help="host:port of process 0 (multi-process off TPU)")
  train.add_argument("--num-processes", type=int)
  train.add_argument("--process-id", type=int)


def run(args, overrides) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  if args.coordinator or args.multihost:
    # Cloud TPU pods find their peers themselves; elsewhere pass them in.
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from kosmos_jax.train import trainer  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config, overrides)
  result = trainer.train(config, args.workdir)
  if jax.process_index() == 0:
    print(json.dumps(result))
