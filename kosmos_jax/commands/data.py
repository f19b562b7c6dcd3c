"""`kosmos-jax data inspect`: examples of a seqio task or mixture, decoded;
`kosmos-jax data export-shapes`: held-out shapes pictures in a benchmark's files."""

TAKES_CONFIG = True
USES_TENSORFLOW = True  # seqio tasks, the vocabulary


def add_parser(sub) -> None:
  data_cmd = sub.add_parser("data", help="seqio tasks and mixtures")
  dsub = data_cmd.add_subparsers(dest="data_command", required=True)
  inspect_cmd = dsub.add_parser(
    "inspect",
    help="print examples of a task or mixture decoded: text with tags, the part "
    "with loss, phrases with boxes; --out draws the boxes; accepts --config.key=value overrides",
  )
  inspect_cmd.add_argument(
    "name", metavar="NAME", help="a registered seqio task or mixture, e.g. shapes_rec, shapes_mix"
  )
  inspect_cmd.add_argument("--split", default="train", help="e.g. train, validation")
  inspect_cmd.add_argument("--num", type=int, default=3, help="examples to print")
  inspect_cmd.add_argument("--out", help="directory for the pictures with their boxes drawn (PNG)")
  inspect_cmd.add_argument(
    "--config",
    help="configs/NAME.py: registers the tasks on your files (data.spm_model_file, "
    "data.data_dir) and trims to its seq_len and images_per_row",
  )

  export_cmd = dsub.add_parser(
    "export-shapes",
    help="held-out shapes pictures with annotations in a real benchmark's files, for "
    "`kosmos-jax eval`",
  )
  export_cmd.add_argument(
    "--format",
    required=True,
    choices=("refcoco", "flickr30k_entities", "coco_caption", "vqav2", "imagefolder"),
  )
  export_cmd.add_argument("--out", required=True, help="directory to write into")
  export_cmd.add_argument("--num", type=int, default=100, help="pictures (default 100)")
  export_cmd.add_argument(
    "--image-size", type=int, default=64, help="picture side in pixels (default 64, the demo's)"
  )


def _export(args) -> None:
  if args.num < 1 or args.image_size < 16:
    raise SystemExit("--num must be at least 1 and --image-size at least 16")
  from kosmos_jax.data import export  # pylint: disable=g-import-not-at-top

  exported = export.export(args.format, args.out, args.num, args.image_size)
  print(f"{exported.command()} --checkpoint CHECKPOINT --out DIR")


def run(args, overrides) -> None:
  """Prints the examples; a bad argument is a one-line error (exit status 2)."""
  if args.data_command == "export-shapes":
    if overrides:
      raise SystemExit(f"export-shapes takes no --config.* overrides: {overrides}")
    return _export(args)
  if args.num < 1:
    raise SystemExit(f"argument --num: must be at least 1, got {args.num}")
  if overrides and not args.config:
    raise SystemExit(f"--config.* overrides need --config: {overrides}")
  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax.data import inspect as data_inspect  # pylint: disable=g-import-not-at-top
  from kosmos_jax.data import loader  # pylint: disable=g-import-not-at-top

  lengths = None
  if args.config:
    config = config_lib.load(args.config, overrides)
    if config.init_from:  # a fine-tune: the checkpoint's model and vocabulary
      from kosmos_jax.train import trainer  # pylint: disable=g-import-not-at-top

      trainer.resolve_init_from(config)
    loader.register_user_tasks(config.data, config.model)
    lengths = {"targets": config.seq_len, "images": config.images_per_row}
    if config.data.get("modalities_per_row"):
      lengths["modalities"] = config.data.modalities_per_row
  try:
    splits = data_inspect.splits(args.name)
  except ValueError as e:
    hint = (
      ""
      if args.config
      else (
        " (tasks on your own files: --config FILE "
        "--config.data.spm_model_file=.. --config.data.data_dir=..)"
      )
    )
    raise SystemExit(f"argument NAME: {e}{hint}") from None
  if args.split not in splits:
    raise SystemExit(
      f"argument --split: {args.split!r} is not a split of {args.name} "
      f"(splits: {', '.join(splits)})"
    )
  found = data_inspect.examples(args.name, args.split, args.num, lengths=lengths, out=args.out)
  for index, example in enumerate(found):
    print(data_inspect.describe(example, index))
