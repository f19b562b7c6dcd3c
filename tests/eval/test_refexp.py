"""RefCOCO/+/g comprehension on a hand-made MDETR file (640 x 320 pictures: a
32-grid cell is 20 x 10 px). Every expected number is worked out in the comments."""

import json
import os

import pytest

from kosmos_jax import errors
from kosmos_jax.eval import common, refexp

# (expression, COCO xywh box, continuation, what it scores)
ROWS = [
  # e0: cells (2, 1)-(4, 4) -> centres (50, 15, 90, 45), inside (40, 10, 100, 50):
  # IoU exactly 0.5, a hit for all three scores.
  ("man on left", (40, 10, 60, 40), "<object><patch_index_0034><patch_index_0132></object>"),
  # e1: the truth is (0, 0, 320, 320). First box: cell (31, 0) -> (620, 0, 640, 10), IoU 0;
  # the phrase again (leading space: stripped) with (0, 0)-(15, 31) -> (10, 5, 310, 315),
  # IoU 0.91. Their mean (315, 2.5, 475, 162.5) has IoU 0.006: only the upper bound hits.
  (
    "woman",
    (0, 0, 320, 320),
    "<object><patch_index_0031><patch_index_0031></object> and<phrase> woman</phrase>"
    "<object><patch_index_0000><patch_index_1007></object>",
  ),
  # e2: the truth is (190, 95, 390, 195). (4, 9)-(14, 19) -> (90, 95, 290, 195) and
  # (14, 9)-(24, 19) -> (290, 95, 490, 195) have IoU 1/3 each; their mean box is the
  # truth (IoU 1): only the mean hits.
  (
    "bus",
    (190, 95, 200, 100),
    "<object><patch_index_0292><patch_index_0622></delimiter_of_multi_objects/>"
    "<patch_index_0302><patch_index_0632></object>",
  ),
  # e3: a box for another phrase only: a 0-area box, a miss counted in the denominator.
  (
    "dog",
    (0, 0, 640, 320),
    "<phrase>a cat</phrase><object><patch_index_0000><patch_index_1023></object>",
  ),
  # e4: the right box, then `</image>`: only the text after it is read, so a miss.
  (
    "ball",
    (40, 10, 60, 40),
    "<object><patch_index_0034><patch_index_0132></object></image> a ball",
  ),
]


def _entry(i, expression, box, dataset_name="refcoco"):
  image = {
    "file_name": f"COCO_train2014_{i:012d}.jpg",
    "height": 320,
    "width": 640,
    "id": i,
    "original_id": 1000 + i,
    "caption": expression,
    "dataset_name": dataset_name,
    "tokens_negative": [[0, len(expression)]],
  }
  x, y, w, h = box
  ann = {
    "area": w * h,
    "iscrowd": 0,
    "category_id": 1,
    "image_id": i,
    "id": i,
    "original_id": 555 + i,
    "bbox": list(box),
    "tokens_positive": [[0, len(expression)]],
  }
  return image, ann


def write_file(root, rows, name="finetune_refcoco_testA.json", dataset_name="refcoco"):
  entries = [_entry(i, e, box, dataset_name) for i, (e, box, *_) in enumerate(rows)]
  path = root / name
  path.write_text(
    json.dumps({"images": [e[0] for e in entries], "annotations": [e[1] for e in entries]})
  )
  return str(path)


@pytest.fixture
def dataset(tmp_path):
  return refexp.load("testA", annotations=write_file(tmp_path, ROWS), image_dir="/coco/train2014")


def _predictions(dataset, skip=()):
  return {
    i: refexp.prediction(dataset.queries[i], row[2]) for i, row in enumerate(ROWS) if i not in skip
  }


def test_load(dataset):
  assert [q.prompt for q in dataset.queries] == [
    f"<grounding><phrase>{row[0]}</phrase>" for row in ROWS
  ]
  assert dataset.queries[1].image == os.path.join(
    "/coco/train2014", "COCO_train2014_000000000001.jpg"
  )
  assert dataset.truth.expressions[2].box == (190.0, 95.0, 390.0, 195.0)  # xywh -> xyxy
  assert (dataset.task, dataset.split, dict(dataset.skipped)) == ("refcoco", "testA", {})
  assert dataset.decoding == common.Decoding(num_beams=1, max_new_tokens=64, no_repeat_ngram_size=3)


def test_score(dataset):
  assert refexp.score(dataset, _predictions(dataset)) == {
    "accuracy": 1 / 5,  # e0
    "accuracy_mean": 2 / 5,  # e0, e2
    "accuracy_upper_bound": 2 / 5,  # e0, e1
    "count": 5.0,
  }


def test_skipped_queries_and_host_sums(dataset):
  metrics = refexp.score(dataset, _predictions(dataset, skip=(3, 4)))
  assert metrics == {
    "accuracy": 1 / 3,
    "accuracy_mean": 2 / 3,
    "accuracy_upper_bound": 2 / 3,
    "count": 3.0,
    "skipped/no prediction (input skipped)": 2.0,
  }
  predictions = _predictions(dataset)
  a = refexp.sums(dataset, {i: t for i, t in predictions.items() if i < 2})
  b = refexp.sums(dataset, {i: t for i, t in predictions.items() if i >= 2})
  total = {k: a[k] + b[k] for k in a}
  assert refexp.from_sums(dataset, total) == refexp.score(dataset, predictions)


def test_prediction_files_round_trip(dataset, tmp_path):
  predictions = _predictions(dataset, skip=(1,))
  path = str(tmp_path / "predictions.txt")
  refexp.write_predictions(path, dataset, predictions)
  read = refexp.read_predictions(path, dataset)
  assert read == predictions
  # e1 (an accuracy miss, an upper-bound hit) not answered: 1/4, 2/4, 1/4.
  metrics = refexp.score(dataset, read)
  assert (metrics["accuracy"], metrics["accuracy_mean"], metrics["accuracy_upper_bound"]) == (
    1 / 4,
    2 / 4,
    1 / 4,
  )
  assert metrics["skipped/no prediction (input skipped)"] == 1.0
  short = tmp_path / "short.txt"
  short.write_text("".join(open(path).readlines()[:3]))
  with pytest.raises(errors.UserError, match="3 H-lines for 5 queries"):
    refexp.read_predictions(str(short), dataset)


def test_bad_rows(tmp_path):
  path = write_file(tmp_path, ROWS[:4])
  data = json.loads(open(path).read())
  data["annotations"][1]["bbox"] = [1, 2, 3]  # not 4 numbers
  data["annotations"][2]["image_id"] = 7  # pairs with another image
  with open(path, "w") as f:
    json.dump(data, f)
  dataset = refexp.load("testA", annotations=path, image_dir="/coco")
  assert [q.prompt for q in dataset.queries] == [
    "<grounding><phrase>man on left</phrase>",
    "<grounding><phrase>dog</phrase>",
  ]
  assert [q.key for q in dataset.queries] == ["0", "1"]
  assert dict(dataset.skipped) == {"row does not parse": 1, "annotation is for another image": 1}
  with pytest.raises(errors.UserError, match=r"testA.json: images\[1\]/annotations\[1\]: row"):
    refexp.load("testA", annotations=path, image_dir="/coco", strict=True)
  assert len(refexp.load("testA", 1, annotations=path, image_dir="/coco").queries) == 1


def test_refused_files(tmp_path):
  other = write_file(tmp_path, ROWS, name="refg.json", dataset_name="refcocog")
  with pytest.raises(errors.UserError, match=r"images\[0\]/annotations\[0\]: dataset_name 'refc"):
    refexp.load("testA", annotations=other, image_dir="/coco")
  assert (
    refexp.load("val", annotations=other, image_dir="/coco", task="refcocog").task == "refcocog"
  )
  named = write_file(tmp_path, ROWS, name="finetune_refcoco+_testB.json", dataset_name="refcoco+")
  with pytest.raises(errors.UserError, match="says refcoco\\+/testB, not refcoco\\+/testA"):
    refexp.load("testA", annotations=named, image_dir="/coco", task="refcoco+")
  with pytest.raises(errors.UserError, match="split 'testA'"):
    refexp.load("testA", annotations=other, image_dir="/coco", task="refcocog")
  with pytest.raises(errors.UserError, match="task 'refclef'"):
    refexp.load("val", annotations=other, image_dir="/coco", task="refclef")
  path = tmp_path / "finetune_refcoco_val.json"
  path.write_text(json.dumps({"images": [{}], "annotations": []}))
  with pytest.raises(errors.UserError, match="1 images for 0 annotations"):
    refexp.load("val", annotations=str(path), image_dir="/coco")
  path.write_text("{")
  with pytest.raises(errors.UserError, match="finetune_refcoco_val.json: not a JSON file"):
    refexp.load("val", annotations=str(path), image_dir="/coco")


def test_nothing_answered(dataset):
  assert refexp.score(dataset, {}) == {
    "count": 0.0,
    "skipped/no prediction (input skipped)": 5.0,
  }
