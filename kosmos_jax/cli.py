"""The `kosmos-jax` command line: `kosmos-jax SUBCOMMAND --help` for each."""
import argparse
import json
import os
import shutil
import sys

from kosmos_jax import heap
from kosmos_jax.infer import cli_generate

# Files of a Hugging Face snapshot besides the weights that a converted
# checkpoint keeps, so that tokenizer, image processor and generation defaults
# travel with it both ways.
_SIDECAR_FILES = ("sentencepiece.bpe.model", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "preprocessor_config.json",
                  "processor_config.json", "generation_config.json")


def _copy_sidecars(src: str, dst: str) -> list[str]:
  copied = []
  for name in _SIDECAR_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.key=value` items from the ordinary arguments."""
  rest, overrides = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config."):].partition("=")
      if not sep:
        value = next(it, None)
        if value is None:
          raise SystemExit(f"{arg}: missing value")
      overrides.append(f"{key}={value}")
    else:
      rest.append(arg)
  return rest, overrides


def cmd_convert(args) -> None:
  from kosmos_jax.convert import hf  # pylint: disable=g-import-not-at-top
  from kosmos_jax.models import loading  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if args.direction == "hf-to-orbax":
    hf_config, tensors = hf.read_hf_dir(args.hf_dir, allow_pickle=args.allow_pickle,
                                        progress=True)
    config = hf.config_from_hf(hf_config)
    params = hf.hf_to_params(tensors, config, progress=True,
                             expected_shapes=loading.abstract_params(config))
    checkpoint.save_params(args.out, config, params)
    sidecars = _copy_sidecars(args.hf_dir, args.out)
    count = sum(v.size for v in tensors.values() if v is not None)
    print(json.dumps({"out": args.out, "tensors": len(tensors), "values": int(count),
                      "copied": sidecars}))
  else:
    config = checkpoint.load_config(args.ckpt)
    params = checkpoint.load_params(args.ckpt, loading.abstract_params(config))
    hf.write_hf_dir(args.out, config, params)
    sidecars = _copy_sidecars(args.ckpt, args.out)
    print(json.dumps({"out": args.out, "copied": sidecars}))


def cmd_summary(args, overrides) -> None:
  """Parameter counts of a config, computed without allocating."""
  import jax  # pylint: disable=g-import-not-at-top
  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax.models import loading  # pylint: disable=g-import-not-at-top
  config = config_lib.load(args.config, overrides)
  params = loading.abstract_params(config.model)
  counts = {name: sum(x.size for x in jax.tree.leaves(sub)) for name, sub in params.items()}
  total = sum(counts.values())
  print(json.dumps({"config": args.config, "parameters": total, **counts,
                    "float32_gib": round(total * 4 / 2**30, 3),
                    "bfloat16_gib": round(total * 2 / 2**30, 3)}))


_TAKES_CONFIG = ("summary", "aot", "train", "demo", "data")


def cmd_aot(args, overrides) -> None:
  """Compiles the train step for a TPU topology on this host and prints the plan."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import aot  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config = config_lib.load(args.config, overrides)
  try:
    _, report = aot.compile_train_step(config, aot.tpu_devices(args.topology), args.topology)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses plans over HBM itself; its first line says by how much.
    raise SystemExit(f"{args.config} {overrides} does not fit a {args.topology} chip "
                     f"(GiB per chip): {str(e).splitlines()[0]}") from e
  print(json.dumps({"config": args.config, "overrides": overrides,
                    **dataclasses.asdict(report), "fits": report.fits()}))
  if not report.fits():
    raise SystemExit(f"{args.config} needs {report.total_gib} GiB per chip; "
                     f"a {args.topology} chip has {report.hbm_gib} GiB")


def cmd_train(args, overrides) -> None:
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


def cmd_demo(args, overrides) -> None:
  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax import demo  # pylint: disable=g-import-not-at-top
  summary = demo.run(config_lib.load(args.config, overrides), args.out, pictures=args.pictures)
  print(demo.describe(summary, args.out))


def cmd_data(args, overrides) -> None:
  """`kosmos-jax data inspect`: argument errors exit 2, as argparse's own do."""
  if args.num < 1:
    args.error(f"argument --num: must be at least 1, got {args.num}")
  if overrides and not args.config:
    args.error(f"--config.* overrides need --config: {overrides}")
  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax.data import inspect as data_inspect  # pylint: disable=g-import-not-at-top
  from kosmos_jax.data import loader  # pylint: disable=g-import-not-at-top
  lengths = None
  if args.config:
    config = config_lib.load(args.config, overrides)
    loader.register_user_tasks(config.data)
    lengths = {"targets": config.seq_len, "images": config.images_per_row}
  try:
    splits = data_inspect.splits(args.name)
  except ValueError as e:
    hint = "" if args.config else (" (tasks on your own files: --config FILE "
                                   "--config.data.spm_model_file=.. --config.data.data_dir=..)")
    args.error(f"argument NAME: {e}{hint}")
  if args.split not in splits:
    args.error(f"argument --split: {args.split!r} is not a split of {args.name} "
               f"(splits: {', '.join(splits)})")
  found = data_inspect.examples(args.name, args.split, args.num, lengths=lengths, out=args.out)
  for index, example in enumerate(found):
    print(data_inspect.describe(example, index))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="kosmos-jax", description="KOSMOS-2 in JAX: convert, inspect, train, generate.")
  sub = parser.add_subparsers(dest="command", required=True)

  convert = sub.add_parser("convert", help="Hugging Face <-> kosmos-jax (Orbax) checkpoints")
  csub = convert.add_subparsers(dest="direction", required=True)
  to_orbax = csub.add_parser("hf-to-orbax", help="HF snapshot dir -> Orbax checkpoint")
  to_orbax.add_argument("--hf-dir", required=True, help="config.json + model.safetensors[.index.json]")
  to_orbax.add_argument("--out", required=True, help="checkpoint directory to write")
  to_orbax.add_argument("--allow-pickle", action="store_true",
                        help="accept pytorch_model.bin (unpickled weights-only)")
  to_hf = csub.add_parser("orbax-to-hf", help="Orbax checkpoint -> HF snapshot dir")
  to_hf.add_argument("--ckpt", required=True, help="checkpoint directory")
  to_hf.add_argument("--out", required=True, help="directory for config.json + model.safetensors")

  summary = sub.add_parser("summary", help="parameter counts of a config (no allocation); "
                           "accepts --config.key=value overrides")
  summary.add_argument("--config", required=True, help="configs/NAME.py")

  aot_cmd = sub.add_parser("aot", help="compile the train step for a TPU topology here "
                           "(libtpu) and print per-chip memory and FLOPs; accepts "
                           "--config.key=value overrides")
  aot_cmd.add_argument("--config", required=True, help="configs/NAME.py")
  aot_cmd.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5p:4x4x4, v4:2x2x4")

  train = sub.add_parser("train", help="train (resumes from the latest checkpoint in --workdir); "
                         "accepts --config.key=value overrides")
  train.add_argument("--config", required=True, help="configs/NAME.py")
  train.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard")
  train.add_argument("--multihost", action="store_true",
                     help="jax.distributed.initialize() (automatic on Cloud TPU pods)")
  train.add_argument("--coordinator", help="host:port of process 0 (multi-process off TPU)")
  train.add_argument("--num-processes", type=int)
  train.add_argument("--process-id", type=int)

  demo_cmd = sub.add_parser("demo", help="train configs/shapes.py from scratch on CPU, score "
                            "referring expressions on held-out pictures, draw boxes; accepts "
                            "--config.key=value overrides")
  demo_cmd.add_argument("--config", default="configs/shapes.py", help="configs/NAME.py")
  demo_cmd.add_argument("--out", default="demo_out", help="pictures, summary.json, train/")
  demo_cmd.add_argument("--pictures", type=int, default=8, help="held-out pictures to draw")

  data_cmd = sub.add_parser("data", help="seqio tasks and mixtures")
  dsub = data_cmd.add_subparsers(dest="data_command", required=True)
  inspect_cmd = dsub.add_parser(
      "inspect", help="print examples of a task or mixture decoded: text with tags, the part "
      "with loss, phrases with boxes; --out draws the boxes; accepts --config.key=value overrides")
  inspect_cmd.add_argument("name", metavar="NAME",
                           help="a registered seqio task or mixture, e.g. shapes_rec, shapes_mix")
  inspect_cmd.add_argument("--split", default="train", help="e.g. train, validation")
  inspect_cmd.add_argument("--num", type=int, default=3, help="examples to print")
  inspect_cmd.add_argument("--out", help="directory for the pictures with their boxes drawn (PNG)")
  inspect_cmd.add_argument(
      "--config", help="configs/NAME.py: registers the tasks on your files (data.spm_model_file, "
      "data.data_dir) and trims to its seq_len and images_per_row")
  inspect_cmd.set_defaults(error=inspect_cmd.error)

  cli_generate.add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  argv, overrides = _split_config_overrides(argv)
  args = build_parser().parse_args(argv)
  if overrides and args.command not in _TAKES_CONFIG:
    raise SystemExit(f"kosmos-jax {args.command} takes no --config.* overrides: {overrides}")
  if args.command in ("train", "demo"):
    heap.keep_freed_memory()  # before jax or tf.data start a thread
  if args.command == "convert":
    cmd_convert(args)
  elif args.command == "summary":
    cmd_summary(args, overrides)
  elif args.command == "aot":
    cmd_aot(args, overrides)
  elif args.command == "train":
    cmd_train(args, overrides)
  elif args.command == "demo":
    cmd_demo(args, overrides)
  elif args.command == "data":
    cmd_data(args, overrides)
  elif args.command == "generate":
    cli_generate.run(args)


if __name__ == "__main__":
  main()
