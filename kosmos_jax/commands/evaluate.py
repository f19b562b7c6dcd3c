"""`kosmos-jax eval`: a checkpoint on a benchmark's files; `kosmos-jax eval score`:
a predictions file (any model's) against them.

  kosmos-jax eval --task refcoco --checkpoint CKPT --annotations finetune_refcoco_val.json \\
      --image-dir train2014 --split val --out DIR
  kosmos-jax eval score --task refcoco --predictions DIR/predictions.txt \\
      --annotations finetune_refcoco_val.json --image-dir train2014 --split val --json

`eval` writes DIR/predictions.{txt,json} in the field's own format (the
official scorers read it unchanged), DIR/metrics.json and a few pictures with
the predicted and true boxes (grounding tasks). `--json` prints the metrics as
one JSON object on the last line of stdout.
"""

import json
import os

from kosmos_jax.commands import generate

USES_TENSORFLOW = True  # a trainer workdir's processor is its seqio vocabulary
TAKES_CONFIG = True

# Every task's data arguments; each task takes some (`kosmos-jax eval --task T
# --help` does not know which, so a wrong one is an error naming the right ones).
DATA_ARGS = {
  "annotations": "the annotation file: MDETR json (flickr30k_entities, refcoco*), Karpathy "
  "json (captions), VQA annotations json, refer's refs(umd).p or MDETR json (refcocog_reg)",
  "questions": "vqav2: v2_OpenEnded_mscoco_<split>_questions.json",
  "flickr_entities_dir": "flickr30k_entities: the folder of Sentences/, Annotations/, <split>.txt",
  "image_dir": "the images' folder",
  "instances": "refcocog_reg with refs(umd).p: refer's instances.json",
  "class_names": "imagenet_zeroshot: one class name per line, in sorted folder order",
  "synset_map": "imagenet_zeroshot: LOC_synset_mapping.txt (synset, names)",
  "train_annotations": "few-shot (--shots): the train split's annotation file (REG, VQAv2)",
  "train_questions": "vqav2 few-shot (--shots): the train split's questions file",
}


def add_parser(sub) -> None:
  from kosmos_jax.eval import tasks  # pylint: disable=g-import-not-at-top

  p = sub.add_parser(
    "eval",
    help="score a checkpoint on a benchmark (or, `eval score`, a predictions file)",
    description=__doc__.split("\n\n")[0],
  )
  p.add_argument("action", nargs="?", choices=("score",), help="score a predictions file")
  p.add_argument("--task", required=True, choices=list(tasks.TASKS))
  p.add_argument("--split", default="val", help="e.g. val, test, testA (default val)")
  p.add_argument("--num", type=generate.positive_int, help="only the first N images / records")
  p.add_argument("--checkpoint", help="HF snapshot, converted checkpoint or trainer workdir")
  p.add_argument("--predictions", help="eval score: the predictions file")
  p.add_argument("--out", help="eval: the output directory")
  p.add_argument(
    "--shots",
    type=int,
    default=0,
    help="few-shot: K demonstrations from the train split before each query, interleaved "
    "(captions, vqav2, refcocog_reg)",
  )
  p.add_argument("--seed", type=int, default=0, help="draws the few-shot demonstrations")
  p.add_argument("--batch-size", type=generate.positive_int, default=16)
  p.add_argument("--strict", action="store_true", help="a bad record is an error, not a skip")
  p.add_argument("--json", action="store_true", help="the metrics as JSON on the last line")
  p.add_argument(
    "--partial",
    action="store_true",
    help="eval score: a JSON results file may leave queries out (skipped images); they are "
    "counted, not refused",
  )
  p.add_argument("--config", help="configs/NAME.py: registers its data tasks (vocabulary)")
  p.add_argument(
    "--num-patches-per-side",
    type=generate.positive_int,
    default=32,
    help="eval score: the location grid of the model that wrote the predictions "
    "(default 32, the released Kosmos-2's; eval reads it from the checkpoint)",
  )
  for name, help_text in DATA_ARGS.items():
    p.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text)


def _load(args, num_patches_per_side: int):
  from kosmos_jax.eval import tasks  # pylint: disable=g-import-not-at-top

  task = tasks.get(args.task)
  given = {k: getattr(args, k) for k in DATA_ARGS if getattr(args, k) is not None}
  if args.shots:
    given["shots"], given["seed"] = args.shots, args.seed
  if "num_patches_per_side" in task.data_args():
    given["num_patches_per_side"] = num_patches_per_side
  for key, value in given.items():
    if key in DATA_ARGS and not os.path.exists(value):
      raise SystemExit(f"--{key.replace('_', '-')} {value}: no such file or directory")
  dataset = task.load(args.split, args.num, strict=args.strict, **given)
  return task, dataset


def _print(metrics: dict, as_json: bool) -> None:
  if as_json:
    print(json.dumps(metrics, sort_keys=True))
    return
  for key, value in metrics.items():
    counted = key == "count" or "/" in key and key.split("/")[0] in ("count", "skipped")
    print(f"{key}: {value:.0f}" if counted else f"{key}: {value:.4f}")


def run(args, overrides) -> None:
  if args.action == "score":
    if not args.predictions:
      raise SystemExit("eval score needs --predictions FILE")
    if not os.path.isfile(args.predictions):
      raise SystemExit(f"--predictions {args.predictions}: no such file")
    task, dataset = _load(args, args.num_patches_per_side)
    import inspect  # pylint: disable=g-import-not-at-top

    takes_partial = "partial" in inspect.signature(task.read_predictions).parameters
    if args.partial and not takes_partial:
      raise SystemExit(f"--partial: {args.task}'s predictions mark skipped queries themselves")
    kwargs = dict(partial=True) if args.partial else {}
    predictions = task.read_predictions(args.predictions, dataset, **kwargs)
    _print(task.score(dataset, predictions), args.json)
    return
  if not args.checkpoint or not args.out:
    raise SystemExit("eval needs --checkpoint and --out (or `eval score --predictions FILE`)")
  from kosmos_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax import sharding  # pylint: disable=g-import-not-at-top
  from kosmos_jax.checkpoints import loading  # pylint: disable=g-import-not-at-top
  from kosmos_jax.data import loader  # pylint: disable=g-import-not-at-top
  from kosmos_jax.eval import pictures, runner  # pylint: disable=g-import-not-at-top

  if args.config:
    config = config_lib.load(args.config, overrides)
    loader.register_user_tasks(config.data, config.model)
  elif overrides:
    raise SystemExit(f"--config.* overrides need --config: {overrides}")
  try:
    where = loading.locate(args.checkpoint)
  except FileNotFoundError as e:
    raise SystemExit(f"--checkpoint {e}") from None
  processor = runner.processor_for(where, loading.model_config(where))
  # The data files are read before the weights load: a bad file fails fast.
  task, dataset = _load(args, processor.vocab.num_patches_per_side)
  model = loading.from_pretrained(where)
  mesh = runner.local_mesh(args.batch_size)
  if mesh is not None:
    sharding.shard_model(model, mesh)
  metrics, predictions = runner.evaluate(
    model,
    processor,
    task,
    dataset,
    out=args.out,
    batch_size=args.batch_size,
    progress=True,
    mesh=mesh,
  )
  pictures.draw(dataset, predictions, os.path.join(args.out, "pictures"), num=8)
  _print(metrics, args.json)
