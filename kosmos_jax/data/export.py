"""Held-out shapes pictures in the files of the real benchmarks.

`kosmos-jax data export-shapes --format F --out DIR` writes the test split's
pictures (never trained on) with annotations in the exact layout users
download for each benchmark, so the evaluators read the demo's data through
the same code as the real data:

  refcoco             finetune_refcoco_val.json (MDETR) + images/
  flickr30k_entities  final_flickr_separateGT_val.json (MDETR) + flickr30k_entities/
                      {val.txt, Sentences/, Annotations/} + images/
  coco_caption        dataset_coco.json (Karpathy: the pictures in "test", up to 16
                      training pictures in "train") + images/{test,train}/
  vqav2               v2_OpenEnded_mscoco_val2014_questions.json +
                      v2_mscoco_val2014_annotations.json + images/COCO_val2014_*.jpg
  imagefolder         images/<class>/*.jpg + class_names.txt (`num` pictures with
                      one shape; the class is its colour and kind, "red circle")

Pictures are `shapes.make_example("test", i, image_size)` for i in
[start, start + num): a pure function, so the files are the same on every
machine and match the demo's held-out REC pictures.
"""

import dataclasses
import json
import os
from xml.etree import ElementTree

import numpy as np

from kosmos_jax.data import shapes

FORMATS = ("refcoco", "flickr30k_entities", "coco_caption", "vqav2", "imagefolder")
_KINDS = {kind: i + 1 for i, kind in enumerate(shapes.SHAPES)}  # COCO-style category ids


@dataclasses.dataclass(frozen=True)
class Exported:
  """The evaluation task that reads the files, its split and data arguments."""

  task: str
  split: str
  args: dict[str, str]

  def command(self) -> str:
    """The `kosmos-jax eval` command line for these files."""
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.args.items())
    return f"kosmos-jax eval --task {self.task} --split {self.split} {flags}"


def _pictures(num: int, image_size: int, start: int, split: str = "test"):
  for index in range(start, start + num):
    example = shapes.make_example(split, index, image_size)
    names = [e.removeprefix("the ").split() for e in example["objects"]["expression"]]
    pixels = np.asarray(example["objects"]["bbox"]) * image_size
    objects = [
      dict(colour=c, kind=k, box=[round(float(v), 2) for v in b])
      for (c, k), b in zip(names, pixels)
    ]
    yield index, example, objects


def _write_image(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _xywh(box) -> list[float]:
  return [box[0], box[1], round(box[2] - box[0], 2), round(box[3] - box[1], 2)]


def _annotation(box, annotation_id: int, image_id: int, category: int, span) -> dict:
  """A COCO-style (MDETR) annotation of a pixel box and the caption span naming it."""
  x, y, w, h = _xywh(box)
  return dict(
    area=round(w * h, 2),
    iscrowd=0,
    image_id=image_id,
    category_id=category,
    id=annotation_id,
    bbox=[x, y, w, h],
    tokens_positive=[list(span)],
  )


def _dump(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f)


def export_refcoco(out: str, num: int, image_size: int, start: int = 0) -> list[str]:
  """MDETR's `finetune_refcoco_val.json`: one image and one annotation entry per expression."""
  images, annotations = [], []
  for index, example, objects in _pictures(num, image_size, start):
    name = f"shapes_test_{index:06d}.jpg"
    _write_image(os.path.join(out, "images", name), example["image"])
    for k, o in enumerate(objects):
      caption = f"the {o['colour']} {o['kind']}"
      entry_id = len(images)
      images.append(
        dict(
          file_name=name,
          height=image_size,
          width=image_size,
          id=entry_id,
          original_id=index,
          caption=caption,
          dataset_name="refcoco",
          tokens_negative=[[0, len(caption)]],
        )
      )
      annotation = _annotation(o["box"], entry_id, entry_id, _KINDS[o["kind"]], (0, len(caption)))
      annotations.append(dict(annotation, original_id=index * 10 + k))
  categories = [dict(supercategory="shape", id=i, name=k) for k, i in _KINDS.items()]
  path = os.path.join(out, "finetune_refcoco_val.json")
  _dump(path, dict(images=images, annotations=annotations, categories=categories))
  return Exported("refcoco", "val", dict(annotations=path, image_dir=os.path.join(out, "images")))


def _flickr_sentence(caption: str, spans, chains) -> str:
  """The caption in Flickr30k Entities markup, `[/EN#<chain>/other a red circle]`,
  punctuation split off as in the real Sentences files."""
  out, pos = [], 0
  for (start, end), chain in zip(spans, chains):
    out.append(caption[pos:start])
    out.append(f"[/EN#{chain}/other {caption[start:end]}]")
    pos = end
  return ("".join(out) + caption[pos:]).replace(".", " .")


def _flickr_xml(name: str, image_size: int, objects, chains) -> bytes:
  root = ElementTree.Element("annotation")
  ElementTree.SubElement(root, "filename").text = name
  size = ElementTree.SubElement(root, "size")
  for tag, value in (("width", image_size), ("height", image_size), ("depth", 3)):
    ElementTree.SubElement(size, tag).text = str(value)
  for o, chain in zip(objects, chains):
    node = ElementTree.SubElement(root, "object")
    ElementTree.SubElement(node, "name").text = str(chain)
    box = ElementTree.SubElement(node, "bndbox")
    for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), o["box"]):
      ElementTree.SubElement(box, tag).text = str(int(round(value)))
  return ElementTree.tostring(root)


def export_flickr30k_entities(out: str, num: int, image_size: int, start: int = 0) -> list[str]:
  """Flickr30k Entities' Sentences/Annotations/val.txt and MDETR's separateGT json."""
  root = os.path.join(out, "flickr30k_entities")
  for sub in ("Sentences", "Annotations"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  ids, images, annotations = [], [], []
  for index, example, objects in _pictures(num, image_size, start):
    image_id = str(1000000 + index)
    ids.append(image_id)
    name = f"{image_id}.jpg"
    _write_image(os.path.join(out, "images", name), example["image"])
    chains = [index * 10 + k + 1 for k in range(len(objects))]
    spans = [(int(c[0]), int(c[1])) for c in example["noun_chunks"]]
    sentence = _flickr_sentence(example["caption"], spans, chains)
    with open(os.path.join(root, "Sentences", f"{image_id}.txt"), "w", encoding="utf-8") as f:
      f.write(sentence + "\n")
    with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "wb") as f:
      f.write(_flickr_xml(name, image_size, objects, chains))
    # MDETR's caption: the sentence's words with the brackets removed.
    caption = example["caption"].replace(".", " .")
    entry_id = len(images)
    images.append(
      dict(
        file_name=name,
        height=str(image_size),
        width=str(image_size),
        id=entry_id,
        caption=caption,
        dataset_name="flickr",
        tokens_negative=[],
        sentence_id=0,
        original_img_id=int(image_id),
        tokens_positive_eval=[[[s, e]] for s, e in spans],
      )
    )
    for o, (s, e) in zip(objects, spans):
      annotations.append(_annotation(o["box"], len(annotations), entry_id, 1, (s, e)))
  with open(os.path.join(root, "val.txt"), "w") as f:
    f.write("\n".join(ids) + "\n")
  path = os.path.join(out, "final_flickr_separateGT_val.json")
  categories = [dict(supercategory="object", id=1, name="object")]
  _dump(path, dict(images=images, annotations=annotations, categories=categories))
  images_dir = os.path.join(out, "images")
  args = dict(annotations=path, flickr_entities_dir=root, image_dir=images_dir)
  return Exported("flickr30k_entities", "val", args)


def export_coco_caption(out: str, num: int, image_size: int, start: int = 0) -> Exported:
  """Karpathy's `dataset_coco.json`: `num` held-out pictures in its test split
  and up to 16 training pictures in its train split (few-shot demonstrations,
  `--shots`). The reference is the caption after its opening "an image of",
  which is the captioning prompt's part."""
  images = []
  for split, count, cocoid in (("test", num, 0), ("train", min(num, 16), 10**6)):
    for index, example, _ in _pictures(count, image_size, start, split):
      name = f"shapes_{split}_{index:06d}.jpg"
      _write_image(os.path.join(out, "images", split, name), example["image"])
      raw = example["caption"].removeprefix("an image of ")
      tokens = raw.replace(".", " ").split()
      n = len(images)
      images.append(
        dict(
          filepath=split,
          filename=name,
          imgid=n,
          split=split,
          sentids=[n],
          sentences=[dict(tokens=tokens, raw=raw, imgid=n, sentid=n)],
          cocoid=cocoid + index,
        )
      )
  path = os.path.join(out, "dataset_coco.json")
  _dump(path, dict(images=images, dataset="coco"))
  args = dict(annotations=path, image_dir=os.path.join(out, "images"))
  return Exported("coco_caption", "test", args)


def _questions(rng: np.random.Generator, objects) -> list[tuple[str, str, str, str]]:
  """(question, answer, answer type, question type) about one picture."""
  n = len(objects)
  out = [("How many shapes are there?", str(n), "number", "how many")]
  colour = str(rng.choice(list(shapes.COLOURS)))
  kind = str(rng.choice(shapes.SHAPES))
  present = any(o["colour"] == colour and o["kind"] == kind for o in objects)
  out.append((f"Is there a {colour} {kind}?", "yes" if present else "no", "yes/no", "is there a"))
  kinds = [o["kind"] for o in objects]
  alone = [o for o in objects if kinds.count(o["kind"]) == 1]
  if alone:
    o = alone[int(rng.integers(len(alone)))]
    out.append((f"What color is the {o['kind']}?", o["colour"], "other", "what color is the"))
  return out


def export_vqav2(out: str, num: int, image_size: int, start: int = 0) -> list[str]:
  """VQAv2's questions and annotations files (val2014 names): a count, a
  yes/no and a colour question per picture; ten agreeing answers each."""
  questions, annotations = [], []
  for index, example, objects in _pictures(num, image_size, start):
    image_id = index
    name = f"COCO_val2014_{image_id:012d}.jpg"
    _write_image(os.path.join(out, "images", name), example["image"])
    rng = np.random.default_rng([7, index])
    for k, (question, answer, answer_type, question_type) in enumerate(_questions(rng, objects)):
      question_id = image_id * 10 + k
      questions.append(dict(image_id=image_id, question=question, question_id=question_id))
      answers = [dict(answer=answer, answer_confidence="yes", answer_id=a + 1) for a in range(10)]
      annotations.append(
        dict(
          question_id=question_id,
          image_id=image_id,
          question_type=question_type,
          answer_type=answer_type,
          multiple_choice_answer=answer,
          answers=answers,
        )
      )
  info = dict(description="kosmos-jax shapes, exported in the VQAv2 format", version="2.0")
  license_ = dict(name="CC BY 4.0", url="https://creativecommons.org/licenses/by/4.0/")
  common = dict(info=info, license=license_, data_subtype="val2014")
  q_path = os.path.join(out, "v2_OpenEnded_mscoco_val2014_questions.json")
  a_path = os.path.join(out, "v2_mscoco_val2014_annotations.json")
  _dump(q_path, dict(task_type="Open-Ended", data_type="mscoco", questions=questions, **common))
  _dump(a_path, dict(data_type="mscoco", annotations=annotations, **common))
  args = dict(questions=q_path, annotations=a_path, image_dir=os.path.join(out, "images"))
  return Exported("vqav2", "val2014", args)


def export_imagefolder(out: str, num: int, image_size: int, start: int = 0) -> Exported:
  """`images/<colour>_<kind>/` folders with `num` one-shape pictures (the first
  ones from `start` on; about a third of the pictures have one shape), and
  `class_names.txt` (one name per folder, in sorted folder order)."""
  classes = sorted(f"{c}_{k}" for c in shapes.COLOURS for k in shapes.SHAPES)
  for name in classes:
    os.makedirs(os.path.join(out, "images", name), exist_ok=True)
  found, index = 0, start
  while found < num:
    (_, example, objects), index = next(_pictures(1, image_size, index)), index + 1
    if len(objects) == 1:
      folder = f"{objects[0]['colour']}_{objects[0]['kind']}"
      name = f"shapes_test_{index - 1:06d}.jpg"
      _write_image(os.path.join(out, "images", folder, name), example["image"])
      found += 1
  path = os.path.join(out, "class_names.txt")
  with open(path, "w") as f:
    f.write("\n".join(c.replace("_", " ") for c in classes) + "\n")
  args = dict(image_dir=os.path.join(out, "images"), class_names=path)
  return Exported("imagenet_zeroshot", "val", args)


EXPORTERS = {
  "refcoco": export_refcoco,
  "flickr30k_entities": export_flickr30k_entities,
  "coco_caption": export_coco_caption,
  "vqav2": export_vqav2,
  "imagefolder": export_imagefolder,
}


def export(fmt: str, out: str, num: int = 100, image_size: int = 64, start: int = 0) -> Exported:
  """Writes `num` held-out pictures in format `fmt` into `out`; what to evaluate them with."""
  if fmt not in EXPORTERS:
    raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
  os.makedirs(out, exist_ok=True)
  return EXPORTERS[fmt](out, num, image_size, start)
