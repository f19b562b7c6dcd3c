"""Instruction data of the shapes world (shapes.py), one conversation file per task.

For each picture, in the conversation format (conversations.py), with the
human value meant for the task prompt of the same name (task_prompts.py):

  vqa               "What colour is the circle?" -> "red" (kinds that occur once),
                    "What shape is the red object?" -> "circle" (colours that occur
                    once), "Where is the red circle?" -> "top left", "How many
                    shapes are there?" -> "two"
  rec               "the red circle" -> "<phrase>the red circle</phrase><box>"
  reg               "<box>" -> "the red circle"
  grounded_caption  "" -> "an image of <phrase>a red circle</phrase><box> at the top left
                    and <phrase>a blue square</phrase><box> at the bottom."

One question per record, so a record is short (the picture's slots and one
prompt) and rows pack several. The caption task's human value is empty: the
file is for its fieldless template (without it the record is counted as an
empty value and dropped). Pictures are JPEGs under `images/`, boxes
normalised, everything a pure function of (split, index, image size).
"""

import json
import os
import shutil
import tempfile

from kosmos_jax.data import shapes

TASKS = ("vqa", "rec", "reg", "grounded_caption")
SPLITS = {"train": "train", "validation": "test"}  # ours -> the shapes split drawn from
VERSION = 1
_COUNTS = ("no", "one", "two", "three")


def default_dir(image_size: int = 64) -> str:
  return os.path.join(shapes.cache_dir(), f"shapes_instruct_{image_size}")


def files(directory: str, split: str) -> dict[str, str]:
  """Each task's JSONL file of `split` ("train" or "validation")."""
  return {task: os.path.join(directory, split, f"{task}.jsonl") for task in TASKS}


def _turns(*values: str) -> list[dict]:
  return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def _box(box) -> list[float]:
  return [round(float(v), 6) for v in box]


def _grounded(caption: str, chunks) -> str:
  """The caption with each noun chunk as `<phrase>chunk</phrase><box>`."""
  out, pos = "", 0
  for start, end, *_ in chunks:
    start, end = int(start), int(end)
    out += f"{caption[pos:start]}<phrase>{caption[start:end]}</phrase><box>"
    pos = end
  return out + caption[pos:]


def conversations(example: dict, image: str) -> dict[str, list[dict]]:
  """Per task, the conversation rows of one `shapes.make_example` picture
  stored at `image` (relative to the files)."""
  names = list(example["objects"]["expression"])
  boxes = [_box(b) for b in example["objects"]["bbox"]]
  objects = [n.split()[1:] for n in names]  # "the red circle" -> [colour, kind]
  colours, kinds = [c for c, _ in objects], [k for _, k in objects]
  row = lambda key, turns, used=(): dict(
    id=f"{example['key']}-{key}", image=image, conversations=turns, boxes=list(used)
  )
  vqa = []
  for (colour, kind), box in zip(objects, example["objects"]["bbox"]):
    if kinds.count(kind) == 1:
      vqa.append(row(f"colour-{kind}", _turns(f"What colour is the {kind}?", colour)))
    if colours.count(colour) == 1:
      vqa.append(row(f"kind-{colour}", _turns(f"What shape is the {colour} object?", kind)))
    where = shapes._where(box).removeprefix("at the ").removeprefix("in the ")
    vqa.append(row(f"where-{colour}-{kind}", _turns(f"Where is the {colour} {kind}?", where)))
  vqa.append(row("count", _turns("How many shapes are there?", _COUNTS[len(names)])))
  rec = [
    row(f"rec-{i}", _turns(n, f"<phrase>{n}</phrase><box>"), [b])
    for i, (n, b) in enumerate(zip(names, boxes))
  ]
  reg = [row(f"reg-{i}", _turns("<box>", n), [b]) for i, (n, b) in enumerate(zip(names, boxes))]
  chunks = example["noun_chunks"]
  caption = _grounded(example["caption"], chunks)
  grounded = [row("caption", _turns("", caption), [_box(c[2:6]) for c in chunks])]
  return dict(vqa=vqa, rec=rec, reg=reg, grounded_caption=grounded)


def write(directory: str, split: str, count: int, image_size: int) -> None:
  """Pictures 0..count-1 of `split` and each task's file, into `directory`."""
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  rows = {task: [] for task in TASKS}
  for index in range(count):
    example = shapes.make_example(SPLITS[split], index, image_size)
    image = f"images/{example['key']}.jpg"
    with open(os.path.join(directory, image), "wb") as f:
      f.write(example["image"])
    for task, found in conversations(example, image).items():
      rows[task] += found
  for task, found in rows.items():
    with open(os.path.join(directory, f"{task}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in found)


def prepare(
  directory: str = "", image_size: int = 64, num_train: int = 1000, num_validation: int = 100
) -> str:
  """Writes both splits under `directory` (default `default_dir(image_size)`)
  unless they are there with these sizes; returns the directory. Each split
  is written aside and renamed into place, so a reader never sees half a
  split and two processes preparing at once both end with a whole one."""
  directory = directory or default_dir(image_size)
  for split, count in (("train", num_train), ("validation", num_validation)):
    target = os.path.join(directory, split)
    stamp = dict(version=VERSION, image_size=image_size, count=count)
    marker = os.path.join(target, "prepared.json")
    if os.path.exists(marker):
      with open(marker) as f:
        if json.load(f) == stamp:
          continue
      shutil.rmtree(target, ignore_errors=True)  # other sizes: written again
    os.makedirs(directory, exist_ok=True)
    aside = tempfile.mkdtemp(dir=directory, prefix=f".{split}-")
    write(aside, split, count, image_size)
    with open(os.path.join(aside, "prepared.json"), "w") as f:
      json.dump(stamp, f)
    try:
      os.rename(aside, target)
    except OSError:  # another process renamed its copy first
      shutil.rmtree(aside, ignore_errors=True)
  return directory


def spm_model_file() -> str:
  """The shapes sentencepiece model (the demo's vocabulary), trained on first use."""
  return shapes.shapes_vocabulary().sentencepiece_model_file
