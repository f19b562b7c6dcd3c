"""RefCOCOg REG: refer's and MDETR's files, the box prompt, few-shot, results and scores."""

import json
import pickle

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from kosmos_jax import errors
from kosmos_jax.eval import common, reg

# image_id -> (width, height); ann_id -> (image_id, xywh box); ref_id -> (ann_id, split, sents).
IMAGES = {1: (640, 480), 2: (500, 500)}
ANNS = {11: (1, [64, 48, 320, 240]), 12: (1, [0, 0, 640, 480]), 21: (2, [100, 100, 50, 50])}
REFS = {
  5: (11, "val", ["the man in a red shirt", "a man wearing red"]),
  6: (12, "val", ["the whole picture"]),
  7: (21, "train", ["a small white dog"]),
  8: (12, "test", ["everything"]),
}
PROMPT_11 = "<phrase> It</phrase><object><patch_index_0099><patch_index_0627></object> is"


def _file_name(image_id):
  return f"COCO_train2014_{image_id:012d}.jpg"


def _image_of(ann_id):
  return ANNS[ann_id][0] if ann_id in ANNS else 1  # a ref may name an unknown object


def _refer(tmp_path, refs=REFS, protocol=2):
  """refer's `refs(umd).p` and `instances.json`."""
  records = [
    {
      "ref_id": ref_id,
      "ann_id": ann_id,
      "image_id": _image_of(ann_id),
      "split": split,
      "file_name": f"COCO_train2014_{_image_of(ann_id):012d}_{ann_id}.jpg",
      "category_id": 1,
      "sent_ids": [10 * ref_id + n for n in range(len(sents))],
      "sentences": [
        {"tokens": s.split(), "raw": s.upper(), "sent_id": 10 * ref_id + n, "sent": s}
        for n, s in enumerate(sents)
      ],
    }
    for ref_id, (ann_id, split, sents) in refs.items()
  ]
  (tmp_path / "refs(umd).p").write_bytes(pickle.dumps(records, protocol=protocol))
  instances = {
    "images": [
      {"id": i, "width": w, "height": h, "file_name": _file_name(i)} for i, (w, h) in IMAGES.items()
    ],
    "annotations": [{"id": a, "image_id": i, "bbox": b} for a, (i, b) in ANNS.items()],
    "categories": [{"id": 1, "name": "person"}],
  }
  (tmp_path / "instances.json").write_text(json.dumps(instances))
  return str(tmp_path / "refs(umd).p"), str(tmp_path / "instances.json")


def _mdetr(tmp_path, split):
  """MDETR's `finetune_refcocog_<split>.json`: one image and annotation per expression."""
  images, annotations = [], []
  for ann_id, wanted, sents in REFS.values():
    if wanted != split:
      continue
    image_id, bbox = ANNS[ann_id]
    for s in sents:
      n = len(images)
      w, h = IMAGES[image_id]
      images.append(
        {"file_name": _file_name(image_id), "height": h, "width": w, "id": n}
        | {"original_id": image_id, "caption": s, "dataset_name": "refcocog"}
      )
      annotations.append({"bbox": bbox, "image_id": n, "id": n, "original_id": ann_id})
  path = tmp_path / f"finetune_refcocog_{split}.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
  return str(path)


def test_load_refer_pickle(tmp_path):
  refs, instances = _refer(tmp_path)
  data = reg.load("val", annotations=refs, instances=instances, image_dir="/coco/train2014")
  assert data.task == "refcocog_reg" and [q.key for q in data.queries] == ["5", "6"]
  # [64, 48, 320, 240] in 640 x 480 is (0.1, 0.1, 0.6, 0.6): cells (3, 3) and (19, 19).
  assert data.queries[0].prompt == PROMPT_11
  assert data.queries[1].prompt.startswith("<phrase> It</phrase><object><patch_index_0000>")
  assert data.queries[0].image == "/coco/train2014/COCO_train2014_000000000001.jpg"
  assert data.truth.references == [REFS[5][2], REFS[6][2]]
  assert data.decoding.num_beams == 1 and not data.skipped
  test = reg.load("test", annotations=refs, instances=instances, image_dir="i")
  assert [q.key for q in test.queries] == ["8"]
  with pytest.raises(errors.UserError, match="need its instances.json"):
    reg.load("val", annotations=refs, image_dir="i")


def test_load_mdetr_groups_the_expressions_of_an_object(tmp_path):
  path = _mdetr(tmp_path, "val")
  data = reg.load("val", annotations=path, image_dir="/coco/train2014")
  assert [q.key for q in data.queries] == ["11", "12"]  # MDETR keeps the ann id, not ref_id
  assert data.queries[0].prompt == PROMPT_11
  assert data.truth.references == [REFS[5][2], REFS[6][2]]
  with pytest.raises(errors.UserError, match="finetune_refcocog_val.json: the val split, not test"):
    reg.load("test", annotations=path, image_dir="i")


def test_few_shot_demonstrations_come_from_train(tmp_path):
  refs, instances = _refer(tmp_path)
  load = lambda **kw: reg.load("val", annotations=refs, instances=instances, image_dir="d", **kw)
  data = load(shots=1, seed=3)
  (image, text) = data.queries[0].demonstrations[0]
  assert image == "d/COCO_train2014_000000000002.jpg"  # the only train object, ref 7
  assert text.startswith("<phrase> It</phrase><object>") and text.endswith(" is a small white dog.")
  assert load(shots=1, seed=3).queries == data.queries  # deterministic
  assert load().queries[0].demonstrations == ()
  with pytest.raises(errors.UserError, match="1 train objects for 2 shots"):
    load(shots=2)
  mdetr = _mdetr(tmp_path, "val")
  with pytest.raises(errors.UserError, match="--train-annotations"):
    reg.load("val", annotations=mdetr, image_dir="d", shots=1)
  train = _mdetr(tmp_path, "train")
  data = reg.load("val", annotations=mdetr, image_dir="d", shots=1, train_annotations=train)
  assert data.queries[1].demonstrations[0][1].endswith(" is a small white dog.")


@pytest.mark.parametrize(
  "continuation, expected",
  [
    (" a man in a red shirt. He is", "a man in a red shirt"),
    (" a man\nin red", "a man"),
    (" the<phrase> dog</phrase> on  the left", "the dog on the left"),
    ("", ""),
  ],
)
def test_prediction_is_the_first_sentence(continuation, expected):
  q = common.Query("5", "x.jpg", PROMPT_11)
  assert reg.prediction(q, continuation) == expected


def test_results_files(tmp_path):
  refs, instances = _refer(tmp_path)
  data = reg.load("val", annotations=refs, instances=instances, image_dir="d")
  path = tmp_path / "reg.json"
  reg.write_predictions(str(path), data, {0: "a man", 1: "the picture"})
  rows = json.loads(path.read_text())
  assert rows == [{"ref_id": 5, "caption": "a man"}, {"ref_id": 6, "caption": "the picture"}]
  assert reg.read_predictions(str(path), data) == {0: "a man", 1: "the picture"}
  path.write_text(json.dumps(rows + [{"ref_id": 7, "caption": "a dog"}]))  # a train ref
  with pytest.raises(errors.UserError, match="ref_id 7 is not in the val split"):
    reg.read_predictions(str(path), data)
  path.write_text(json.dumps(rows[:1]))
  with pytest.raises(errors.UserError, match="results for 1 of the 2 queries"):
    reg.read_predictions(str(path), data)


def test_score_is_refevaluations(tmp_path):
  refs, instances = _refer(tmp_path)
  data = reg.load("val", annotations=refs, instances=instances, image_dir="d")
  predictions = {0: "a man in red", 1: "the picture"}
  metrics = reg.score(data, predictions)
  # refEvaluation: PTB-tokenized `sent`s of each ref vs the prediction, coco-caption scorers.
  gts = PTBTokenizer().tokenize({k: [{"caption": s} for s in REFS[k][2]] for k in (5, 6)})
  res = PTBTokenizer().tokenize({5: [{"caption": "a man in red"}], 6: [{"caption": "the picture"}]})
  assert metrics["CIDEr"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
  assert metrics["BLEU-4"] == pytest.approx(100 * Bleu(4).compute_score(gts, res, 0)[0][3])
  assert 0 < metrics["METEOR"] < 100 and metrics["count"] == 2


def test_bad_records_are_counted_or_raised(tmp_path):
  refs = dict(REFS)
  refs[9] = (99, "val", ["not in instances"])
  refs[10] = (11, "val", [])
  path, instances = _refer(tmp_path, refs)
  data = reg.load("val", annotations=path, instances=instances, image_dir="d")
  assert [q.key for q in data.queries] == ["5", "6"]
  assert dict(data.skipped) == {"object not in the instances file": 1, "ref does not parse": 1}
  with pytest.raises(errors.UserError, match=r"refs\(umd\).p: ref 4 \(ref_id 9\): object not in"):
    reg.load("val", annotations=path, instances=instances, image_dir="d", strict=True)


def test_pickles_with_objects_are_refused(tmp_path):
  (tmp_path / "refs.p").write_bytes(pickle.dumps([{"ref_id": 1, "when": range(3)}]))
  with pytest.raises(errors.UserError, match="refs.p: cannot read refer's refs pickle"):
    reg.load("val", annotations=str(tmp_path / "refs.p"), instances="i.json", image_dir="d")
