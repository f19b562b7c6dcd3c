"""`kosmos-jax generate`: grounded captions and referring expressions for image files.

Every image gets the same prompt, in one batch. Inputs are checked before the
weights are read (a real checkpoint takes a while to load), and each bad
input is an error that names it.
"""

import argparse
import json
import os

USES_TENSORFLOW = True  # the processor's vocabulary
DEFAULT_PROMPT = "<grounding>An image of"
# The reference's greedy captioning budget (reference/kosmos2.md 1.11).
DEFAULT_MAX_NEW_TOKENS = 128
# Modes that PIL turns into RGB faithfully. 16-bit and float images (I, I;16,
# F) would be clipped to black and white, LAB and HSV read as if RGB.
IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def _box(text: str) -> tuple[float, float, float, float]:
  try:
    box = tuple(float(v) for v in text.split(","))
  except ValueError:
    box = ()
  if len(box) != 4 or not all(0 <= v <= 1 for v in box) or box[2] <= box[0] or box[3] <= box[1]:
    raise argparse.ArgumentTypeError(
      f"{text!r} is not x1,y1,x2,y2 with coordinates in [0, 1] (fractions of the "
      "image width and height), x2 > x1 and y2 > y1"
    )
  return box


def _number(cast, low, what: str, strict: bool = False):
  """An argparse type: `cast(text)`, at least `low` (above it if `strict`)."""

  def parse(text: str):
    try:
      value = cast(text)
    except ValueError:
      value = None
    if value is None or not (value > low if strict else value >= low):
      raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value

  return parse


positive_int = _number(int, 1, "a positive integer")
non_negative_int = _number(int, 0, "an integer >= 0")
positive_float = _number(float, 0, "a number > 0", strict=True)


def add_parser(sub) -> None:
  """Registers `generate` on the subparsers of the `kosmos-jax` parser."""
  p = sub.add_parser(
    "generate",
    help="grounded captions / referring expressions for images: text, "
    "entities with boxes, annotated pictures",
  )
  p.add_argument(
    "--checkpoint",
    required=True,
    help="Hugging Face snapshot directory or kosmos-jax checkpoint, with the "
    "processor files (sentencepiece.bpe.model, preprocessor_config.json)",
  )
  p.add_argument("--image", action="append", help="image file; repeat for several (one batch)")
  p.add_argument(
    "--prompts-file",
    help='a batch from a JSON-lines file, one {"prompt": ..., "images": [files]} per line '
    "(instead of --image and --prompt; image paths as given, from the working directory)",
  )
  p.add_argument(
    "--prompt",
    help=f"default {DEFAULT_PROMPT!r}; with --box the referring "
    "prompt '<phrase> It</phrase><object>..</object> is', or a prompt whose one "
    "<phrase>..</phrase> the box is attached to; with <image> in it, one interleaved "
    "text that takes the --image files in order ('<image> A red circle. <image> A')",
  )
  p.add_argument("--box", type=_box, help="x1,y1,x2,y2 in [0, 1]: describe this region (REG)")
  p.add_argument(
    "--max-new-tokens",
    type=positive_int,
    help=f"default: the checkpoint's generation config, else {DEFAULT_MAX_NEW_TOKENS}",
  )
  p.add_argument(
    "--num-beams", type=positive_int, help="default: the checkpoint's generation config"
  )
  p.add_argument(
    "--min-new-tokens",
    type=non_negative_int,
    help="no EOS before this many new tokens (default: the checkpoint's generation config)",
  )
  p.add_argument(
    "--repetition-penalty",
    type=positive_float,
    help="> 1 makes tokens already in the text (prompt included) less likely, as transformers",
  )
  p.add_argument(
    "--stop-string",
    action="append",
    help="end a text once it ends with this string; repeat for several",
  )
  p.add_argument(
    "--num-return-sequences",
    type=positive_int,
    help="the best N beams per image (N <= --num-beams), best first",
  )
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute dtype (parameters stay as stored)",
  )
  p.add_argument(
    "--json",
    action="store_true",
    help="one JSON object per image: image, text, entities, token_ids",
  )
  p.add_argument("--out", help="directory for the images with their boxes drawn (PNG)")


def check_processor_files(path: str) -> None:
  from kosmos_jax.processing import files  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(path):
    raise SystemExit(f"--checkpoint {path}: not a directory")
  for names in files.REQUIRED:
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
      raise SystemExit(
        f"--checkpoint {path}: missing processor file {' or '.join(names)}; a Hugging Face "
        "snapshot has it, and `kosmos-jax convert` copies it into our checkpoints"
      )


def checkpoint_processor(where, config):
  """The checkpoint's processor files, pictures at the model's
  `vision.image_size`; for a trainer workdir, the vocabulary of the mixture
  it trained on at the model's sizes, as `kosmos-jax eval` finds it
  (eval/runner.py)."""
  if where.kind == "workdir":
    from kosmos_jax.eval import runner  # pylint: disable=g-import-not-at-top

    return runner.processor_for(where, config)
  check_processor_files(where.path)
  from kosmos_jax.processing import processor as processor_lib  # pylint: disable=g-import-not-at-top

  return processor_lib.Processor.from_pretrained(where.path, image_size=config.vision.image_size)


def read_image(path: str, index: int):
  """An image file as an (H, W, 3) uint8 array."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from kosmos_jax.processing import images  # pylint: disable=g-import-not-at-top

  try:
    picture = Image.open(path)
    picture.load()
  except (OSError, ValueError) as e:
    raise SystemExit(f"--image #{index} {path}: cannot read it as an image: {e}") from e
  if picture.mode not in IMAGE_MODES:
    raise SystemExit(
      f"--image #{index} {path}: unsupported mode {picture.mode!r}; "
      f"convert it to 8-bit RGB (readable modes: {', '.join(IMAGE_MODES)})"
    )
  return images.to_rgb(picture, index)


def build_inputs(processor, pictures, prompt: str | None, box, max_positions: int) -> dict:
  """Processor inputs for every picture; `box` makes the referring (REG) prompt."""
  from kosmos_jax.processing import grounding  # pylint: disable=g-import-not-at-top

  bboxes = None
  if prompt is not None and "<image>" in prompt:  # one interleaved text reads every image
    if box is not None:
      raise SystemExit("--box: not with an interleaved --prompt (one with <image> in it)")
    try:
      inputs = processor(text=[prompt], images=[list(pictures)])
    except ValueError as e:
      raise SystemExit(f"--prompt {prompt!r} with {len(pictures)} --image: {e}") from e
    return _check_length(inputs, processor, max_positions)
  if box is not None and prompt is None:
    prompt = grounding.reg_prompt(box, processor.vocab.num_patches_per_side)
  elif box is not None:  # The box goes after the prompt's one phrase.
    bboxes = [[box]] * len(pictures)
  prompt = DEFAULT_PROMPT if prompt is None else prompt
  try:
    inputs = processor(text=[prompt] * len(pictures), images=list(pictures), bboxes=bboxes)
  except ValueError as e:
    raise SystemExit(f"--prompt {prompt!r}{'' if box is None else ' with --box'}: {e}") from e
  return _check_length(inputs, processor, max_positions)


def _check_length(inputs: dict, processor, max_positions: int) -> dict:
  length = inputs["input_ids"].shape[1]
  if length > max_positions:
    raise SystemExit(
      f"--prompt: the input is {length} tokens ({processor.num_image_tokens} of "
      f"them image slots); the model takes at most {max_positions} "
      "(text.max_positions)"
    )
  return inputs


def describe(processor, ids, prompt_length: int) -> list[dict]:
  """Per row of `generate`'s output: clean text, entities and the token ids up
  to the first EOS, or without the padding after a stop string."""
  results = []
  for row in ids.tolist():
    answer = processor.answer(row[:prompt_length], row[prompt_length:])
    new = answer.pop("new_ids")
    results.append(dict(answer, token_ids=row[:prompt_length] + new))
  return results


def _picture_paths(images: list[str], out: str) -> list[str]:
  """`out/<name>.png` per image, numbered where names repeat."""
  names = [os.path.splitext(os.path.basename(p))[0] for p in images]
  return [
    os.path.join(out, f"{n}.png" if names.count(n) == 1 else f"{n}-{i}.png")
    for i, n in enumerate(names)
  ]


def _print_text(result: dict) -> None:
  print(f"{result['image']}: {result['text']}")
  for e in result["entities"]:
    boxes = " ".join("(" + ", ".join(f"{v:.3f}" for v in b) + ")" for b in e["boxes"])
    print(f"  {e['phrase']!r} {tuple(e['span'])}: {boxes}")
  if "picture" in result:
    print(f"  -> {result['picture']}")


def read_prompts_file(path: str) -> list[dict]:
  """`{"prompt": str, "images": [paths]}` per line; errors name the line."""
  if not os.path.isfile(path):
    raise SystemExit(f"--prompts-file {path}: no such file")
  lines = []
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        line = json.loads(text)
      except ValueError as e:
        raise SystemExit(f"--prompts-file {path}:{number}: not JSON ({e})") from None
      if not (
        isinstance(line, dict)
        and isinstance(line.get("prompt"), str)
        and isinstance(line.get("images", []), list)
        and all(isinstance(p, str) for p in line.get("images", []))
      ):
        raise SystemExit(
          f'--prompts-file {path}:{number}: expected {{"prompt": str, "images": [paths]}}'
        )
      lines.append(dict(prompt=line["prompt"], images=line.get("images", [])))
  if not lines:
    raise SystemExit(f"--prompts-file {path}: no prompts")
  return lines


def run(args, overrides) -> None:
  """`kosmos-jax generate`."""
  del overrides
  if bool(args.prompts_file) == bool(args.image):
    raise SystemExit("give --image (with --prompt) or --prompts-file, not both")
  if args.prompts_file and (args.prompt or args.box):
    raise SystemExit("--prompt and --box go with --image; a --prompts-file line has its prompt")
  from kosmos_jax.checkpoints import loading  # pylint: disable=g-import-not-at-top

  try:
    where = loading.locate(args.checkpoint)  # the kind of checkpoint, decided once
  except FileNotFoundError as e:
    raise SystemExit(f"--checkpoint {e}") from None
  from kosmos_jax.processing import visualize  # pylint: disable=g-import-not-at-top

  # The model config alone first: the prompt is checked before any weights load.
  config = loading.model_config(where)
  processor = checkpoint_processor(where, config)
  if args.prompts_file:
    lines = read_prompts_file(args.prompts_file)
    images = [[read_image(p, i) for p in line["images"]] for i, line in enumerate(lines)]
    try:
      inputs = processor(text=[line["prompt"] for line in lines], images=images)
    except ValueError as e:
      raise SystemExit(f"--prompts-file {args.prompts_file}: {e}") from e
    inputs = _check_length(inputs, processor, config.text.max_positions)
    # Each line's boxes are drawn on its last image, named by the line.
    pictures = [line_images[-1] if line_images else None for line_images in images]
    names = [f"line{i + 1}" for i in range(len(lines))]
  else:
    pictures = [read_image(path, i) for i, path in enumerate(args.image)]
    inputs = build_inputs(processor, pictures, args.prompt, args.box, config.text.max_positions)
    names = args.image
  model = loading.from_pretrained(where, dtype=args.dtype)
  max_new = (
    args.max_new_tokens or model.generation_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
  )
  try:
    ids = model.generate(
      **inputs,
      max_new_tokens=max_new,
      num_beams=args.num_beams,
      min_new_tokens=args.min_new_tokens,
      repetition_penalty=args.repetition_penalty,
      stop_strings=args.stop_string,
      tokenizer=processor,
      num_return_sequences=args.num_return_sequences,
    )
  except ValueError as e:  # e.g. more sequences than beams
    raise SystemExit(f"generate: {e}") from None
  results = describe(processor, ids, inputs["input_ids"].shape[1])
  texts = inputs["input_ids"].shape[0]
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  if texts < len(pictures):  # interleaved: one text, its boxes drawn on its last image
    pictures, names = pictures[-1:], args.image[-1:]
  paths = _picture_paths(names, args.out) if args.out else [None] * len(pictures)
  per_text = len(results) // texts  # --num-return-sequences, best first
  for i, result in enumerate(results):
    path, picture, image = paths[i // per_text], pictures[i // per_text], names[i // per_text]
    result = dict(image=image, **result)
    if per_text > 1:
      result["sequence"] = i % per_text
      path = path and f"{path[: -len('.png')]}-seq{i % per_text}.png"
    if path and picture is not None:
      entities = [(e["phrase"], e["span"], e["boxes"]) for e in result["entities"]]
      visualize.draw_entities(picture, entities).save(path)
      result["picture"] = path
    if args.json:
      print(json.dumps(result, ensure_ascii=False))
    else:
      _print_text(result)
